"""Progress bars (rich) for every step that takes more than a few seconds."""

from __future__ import annotations

import os
import sys
from typing import Iterable, Iterator, TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

Item = TypeVar("Item")


def track(items: Iterable[Item], description: str, total: int | None = None, enabled: bool = True) -> Iterator[Item]:
    """Yield from `items`, drawing a progress bar on stderr when `enabled` (and only in the first of several
    processes)."""
    if not enabled or int(os.environ.get("RANK", "0")) != 0:
        yield from items
        return
    from rich.console import Console

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=Console(file=sys.stderr), transient=True) as progress:
        yield from progress.track(items, total=total, description=description)
