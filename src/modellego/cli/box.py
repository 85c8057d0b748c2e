"""`modellego box ...`: the catalogue of sources, profiles and components (modellego.box)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from modellego.cli.options import (
    MAX_SAMPLES_PER_CLASS,
    DataRootOption,
    DeviceOption,
    LazyModule,
    data_options,
    option_int,
    out,
    percent,
    print_json,
    safe,
)

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
    for key, value in entry.record().items():
        shown = value if isinstance(value, str) else json.dumps(value)
        out.print(safe(f"{key}: {shown}"))
    for parent in lineage:
        names = ", ".join(f"{dataset}:{name}" for dataset, name in parent.classes[:6]) + \
            (", ..." if len(parent.classes) > 6 else "")
        out.print(safe(f"made from {parent.label()}: {names} ({parent.path})"))


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



@box_app.command("build")
def build(classes: str = typer.Option(..., "--classes", help='The classes, in output order, as DATASET:CLASS '
                                      '(e.g. "fashion-mnist:Trouser,fashion-mnist:Bag,digits:3").'),
          out_path: Optional[Path] = typer.Option(None, "--out", help="The model file to write (.safetensors)."),
          dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan only: nothing is cut or written."),
          max_flops: Optional[float] = typer.Option(None, "--max-flops", help="Most FLOPs per sample the members "
                                                    "may take in total (e.g. 2e6)."),
          mode: Optional[str] = typer.Option(None, "--mode", help="Assembly mode, as `modellego assemble` takes it "
                                             "(default parallel)."),
          calibration: Optional[str] = typer.Option(None, "--calibration", help="Calibration, as `modellego "
                                                    "assemble` takes it (default auto)."),
          samples_per_class: int = typer.Option(50, "--samples-per-class", help="Images per class in the profiles "
                                                "the build makes."),
          as_json: bool = typer.Option(False, "--json", help="Print the plan and result as JSON."),
          data_root: Optional[Path] = DataRootOption,
          device: str = DeviceOption,
          box_path: Optional[Path] = BoxOption) -> None:
    """A model for these classes from the box: reuse registered components, cut the missing ones from registered
    models (profiling them first where needed), assemble, calibrate, measure and register it."""
    from modellego.errors import ModellegoError

    option_int("--samples-per-class", samples_per_class, 1, MAX_SAMPLES_PER_CLASS)
    if max_flops is not None and not (1 <= max_flops < 2 ** 63):
        raise ModellegoError(f"--max-flops must be a positive number of FLOPs per sample, got {max_flops:g}")
    if out_path is None and not dry_run:
        raise ModellegoError("give --out FILE for the model to build, or --dry-run to see the plan only")
    limit = None if max_flops is None else int(max_flops)
    with catalogue.Box(box_path) as opened:
        plan = opened.plan(classes, limit)
        if not as_json:
            for line in plan.lines():
                out.print(safe(line))
        if dry_run:
            if as_json:
                print_json({"plan": plan.record()})
            return
        built = opened.build(plan, out_path, max_flops=limit, mode=mode, calibration=calibration,
                             samples_per_class=samples_per_class, data=data_options(data_root, None, False),
                             progress=not as_json, device=device)
    if as_json:
        print_json(built.record())
        return
    expected = "" if built.expected is None else f" (expected {percent(built.expected)} from its members' own)"
    how = "" if built.calibration is None else f", calibration {built.calibration}"
    made = sum(entry.kind == "component" for entry in built.made)
    out.print(safe(f"built {built.path}: {len(plan.classes)} classes from {len(built.members)} member"
                   f"{'s' * (len(built.members) != 1)}{how} ({made} cut for it), entry {built.entry.id}"))
    out.print(safe(f"accuracy {percent(built.accuracy)} on the classes' {built.samples:,} test images{expected}; "
                   f"{built.params:,} params, {built.flops:,} FLOPs per sample; {built.seconds:.1f} s"))
