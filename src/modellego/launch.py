"""`python -m modellego.launch [torchrun's options] COMMAND [ARGS]`: torchrun running `modellego COMMAND ARGS`,
with modellego's way of failing. torchrun itself answers a failed process with its own traceback (its
ChildFailedError) and exit code 1, and only the process that met an error knows it; here every process leaves its
`error:` line in a folder, and the launcher prints one line once — a user error's before anything else (the others
then only lose their connection), the first to fail among them — and exits with its code (2 for a user error, 1
for a bug), torchrun's traceback and logs not shown (`--debug`, given to the command, shows them)."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

from modellego.errors import ERRORS_FOLDER


def split(args: list[str]) -> tuple[list[str], list[str]]:
    """torchrun's options and the modellego command with its arguments: the command starts at the first
    argument that names one."""
    from modellego.cli.quick import COMMANDS

    names = {name for name, _ in COMMANDS}
    for position, arg in enumerate(args):
        if arg in names:
            return args[:position], args[position:]
    raise SystemExit("usage: python -m modellego.launch [torchrun options] COMMAND [ARGS]; COMMAND is one of "
                     + ", ".join(sorted(names)))


def main(argv: list[str] | None = None) -> None:
    options, command = split(sys.argv[1:] if argv is None else argv)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    debug = "--debug" in command
    if not debug:  # torchrun's notes (OMP_NUM_THREADS) and its report of a failed process
        for name in ("torch.distributed.elastic", "torch.distributed.run"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="modellego-errors-") as folder:
        os.environ[ERRORS_FOLDER] = folder
        try:
            run(parse_args([*options, "-m", "modellego", *command]))
        except ChildFailedError as failure:
            # the root cause: a user error before the others' lost connections, then the first to fail
            left = [(path.read_text().split("\n", 1), path.stat().st_mtime_ns, path.name)
                    for path in Path(folder).glob("rank-*.txt")]
            if left:
                (code, line), _, _ = min(left, key=lambda item: (item[0][0] != "2", item[1], item[2]))
                sys.stderr.write(line)
                sys.exit(int(code))
            if debug:
                raise
            exits = sorted({info.exitcode for info in failure.failures.values()})
            sys.stderr.write(f"error: a process of the run failed (exit code {', '.join(map(str, exits))}) without "
                             "a modellego error; rerun with --debug after the command to see torchrun's report\n")
            sys.exit(1)


if __name__ == "__main__":
    main()
