"""The one exception type for mistakes a user can fix: bad names, bad files, bad numbers; and where a process
started by modellego.launch leaves its error for the launcher to print."""

from __future__ import annotations

import os
from pathlib import Path

ERRORS_FOLDER = "MODELLEGO_ERRORS_FOLDER"  # set by modellego.launch for its processes


class ModellegoError(Exception):
    """A user-facing error: its message is one readable line saying what is wrong and how to fix it.

    The CLI prints it without a traceback and exits with code 2.
    """


def leave_error(folder: Path, line: str, code: int) -> None:
    """A process's `error:` line and exit code, for modellego.launch (one file per process, named by its rank)."""
    rank = int(os.environ.get("RANK", "0"))
    (folder / f"rank-{rank:06d}.txt").write_text(f"{code}\n{line}\n")
