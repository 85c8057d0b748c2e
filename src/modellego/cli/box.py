"""`modellego box ...`: the catalogue of sources, profiles and components (modellego.box)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from modellego.cli.options import LazyModule, out, percent, safe

catalogue = LazyModule("modellego.box")
box_app = typer.Typer(no_args_is_help=True)  # added to the application after its other commands (application.py)
BoxOption = typer.Option(None, "--box", help="The box file (default: $MODELLEGO_BOX, else "
                         "~/.local/share/modellego/box.sqlite).")


@box_app.callback()
def box() -> None:
    """The box: a catalogue of models, profiles and components to search and build from."""


@box_app.command("add")
def add(files: list[Path] = typer.Argument(..., help="modellego files: models, profiles, components, assemblies."),
        box_path: Optional[Path] = BoxOption) -> None:
    """Register files in the box (all or none; a file already there is refused)."""
    described = [catalogue.describe(file) for file in files]  # a bad file is refused before the box is touched
    with catalogue.Box(box_path) as opened:
        for entry in opened.add(described):
            out.print(safe(f"added {entry.id}: {entry.kind} {entry.path} ({len(entry.classes)} classes)"))


@box_app.command("list")
def list_entries(dataset: Optional[str] = typer.Option(None, "--dataset", help="Only entries with classes of it."),
                 class_name: Optional[str] = typer.Option(None, "--class", help="Only entries holding this class."),
                 arch: Optional[str] = typer.Option(None, "--arch", help="Only entries of this builder."),
                 kind: Optional[str] = typer.Option(None, "--kind", help="model, component, assembly or profile."),
                 as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
                 box_path: Optional[Path] = BoxOption) -> None:
    """The box's entries, filtered."""
    with catalogue.Box(box_path) as opened:
        found = opened.find(kind, dataset, class_name, arch)
    if as_json:
        print(json.dumps([entry.record() for entry in found], indent=1))
        return
    table = Table(title=safe(f"{len(found)} entries"))
    for column in ("id", "kind", "builder", "classes", "params", "FLOPs", "accuracy", "file"):
        table.add_column(column, justify="right" if column in ("id", "params", "FLOPs", "accuracy") else "left")
    for entry in found:
        names = ", ".join(f"{dataset}:{name}" for dataset, name in entry.classes[:6]) + \
            (", ..." if len(entry.classes) > 6 else "")
        table.add_row(str(entry.id), entry.kind, safe(entry.builder or "—"), safe(names),
                      "—" if entry.params is None else f"{entry.params:,}",
                      "—" if entry.flops is None else f"{entry.flops:,}",
                      "—" if entry.accuracy is None else percent(entry.accuracy), safe(entry.path))
    out.print(table)


@box_app.command("show")
def show(entry_id: int = typer.Argument(..., help="The entry's id (see `box list`)."),
         box_path: Optional[Path] = BoxOption) -> None:
    """Everything the box knows about one entry, and what it descends from."""
    with catalogue.Box(box_path) as opened:
        entry = opened.get(entry_id)
        lineage = opened.lineage(entry)
    out.print(safe(json.dumps(entry.record(), indent=1)))
    for parent in lineage:
        out.print(safe(f"from {parent.id}: {parent.kind} {parent.path}"))


@box_app.command("verify")
def verify(box_path: Optional[Path] = BoxOption) -> None:
    """Rehash every registered file: a changed or missing file is reported (exit 2)."""
    from modellego.errors import ModellegoError

    with catalogue.Box(box_path) as opened:
        states = opened.verify()
        bad = {entry_id: state for entry_id, state in states.items() if state != "ok"}
        for entry_id, state in bad.items():
            out.print(safe(f"entry {entry_id}: {state} ({opened.get(entry_id).path})"))
    if bad:
        raise ModellegoError(f"{len(bad)} of {len(states)} registered files are changed or missing; `box remove` "
                             "them or add them again")
    out.print(f"all {len(states)} registered files are as they were added")


@box_app.command("remove")
def remove(entry_id: int = typer.Argument(..., help="The entry's id."),
           force: bool = typer.Option(False, "--force", help="Remove it even if registered entries come from it."),
           box_path: Optional[Path] = BoxOption) -> None:
    """Unregister an entry (its file stays on disk)."""
    with catalogue.Box(box_path) as opened:
        entry = opened.remove(entry_id, force)
    out.print(safe(f"removed {entry.id}: {entry.kind} {entry.path}"))

