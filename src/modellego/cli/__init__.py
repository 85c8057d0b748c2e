"""The `modellego` command. `--version` and the top-level help answer at once (cli/quick.py); everything else
runs the application (cli/application.py), which imports torch."""

from __future__ import annotations

import sys

from modellego.cli.quick import answer


def main() -> None:
    """Entry point (see cli/application.py's `main` for how errors and warnings are reported)."""
    if answer(sys.argv[1:]):
        return
    from modellego.cli.application import main as run

    run()
