"""`python -m modellego` is the `modellego` command."""

from modellego.cli import main

main()
