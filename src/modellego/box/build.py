"""`build`: a model for asked classes from the box — the plan (`plan.py`) carried out with the library's own
commands: profile what no registered profile holds, disassemble what no registered component answers (both
written to the box's folder and registered), assemble and calibrate the members (defaults unless told), measure
the result on the asked classes' test images, and register it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from modellego.box.catalogue import Catalogue, Entry, describe
from modellego.box.plan import Plan, Step, free_path, plan, slug
from modellego.errors import ModellegoError

if TYPE_CHECKING:
    from modellego.data.task import DataOptions

PROFILE_SAMPLES = 50  # per class, as `modellego profile` takes by default


@dataclass
class Built:
    """What `build` made: the plan it followed, the file, its test accuracy on the asked classes (Score1) against
    the members' own (expected), its size, the entries it registered and how long it took."""

    plan: Plan
    path: Path
    accuracy: float
    samples: int
    expected: float | None
    params: int
    flops: int
    members: list[Entry]
    entry: Entry
    made: list[Entry] = field(default_factory=list)  # profiles and components cut for this build
    seconds: float = 0.0
    calibration: str | None = None

    def record(self) -> dict[str, Any]:
        return {"path": str(self.path), "classes": [f"{d}:{n}" for d, n in self.plan.classes],
                "accuracy": self.accuracy, "samples": self.samples, "expected_accuracy": self.expected,
                "params": self.params, "flops": self.flops, "members": [{"id": m.id, "kind": m.kind, "path": m.path, "classes": [f"{d}:{n}" for d, n in m.classes],
                             "flops": m.flops, "accuracy": m.accuracy} for m in self.members],
                "entry": self.entry.id, "made": [m.id for m in self.made], "seconds": self.seconds,
                "calibration": self.calibration, "plan": self.plan.record()}


def build(box: Catalogue, classes: str | Sequence[str] | Plan, out: str | Path, max_flops: int | None = None,
          mode: str | None = None, calibration: str | None = None, samples_per_class: int = PROFILE_SAMPLES,
          data: "DataOptions | None" = None, progress: bool = True, device: Any = "auto") -> Built:
    """Make and register a model answering `classes` (names or a `plan` of them), in that order, at `out`; see
    the module docstring. Assembly `mode` and `calibration` are `modellego assemble`'s (its defaults unless
    given); new profiles keep `samples_per_class` images per class. A member over `max_flops` in total is
    refused before assembling (components cut so far stay registered: they are valid files)."""
    from modellego.commands.assemble import assemble
    from modellego.commands.common import open_model, write
    from modellego.commands.evaluate import evaluate_file
    from modellego.io.atomic import check_output_path

    started = time.perf_counter()
    chosen = classes if isinstance(classes, Plan) else plan(box, classes, max_flops)
    target = check_output_path(out).resolve()
    registered = box.id_of(str(target))
    if registered is not None:
        raise ModellegoError(f"--out {target} is entry {registered} in the box; choose another --out, or `box "
                             f"remove {registered}` first")
    if mode is not None or calibration is not None:  # refused before any work, as `assemble` would refuse them
        from modellego.core.assemble import AssemblyMode
        from modellego.core.gates import Calibration

        if mode is not None:
            AssemblyMode.parse(mode)
        if calibration is not None:
            Calibration.parse(calibration)
    made: list[Entry] = []
    members = [step.use if step.use is not None else _cut(box, step, samples_per_class, data, progress, device, made)
               for step in chosen.steps]
    flops = sum(int(member.flops or 0) for member in members)
    if max_flops is not None and flops > max_flops:
        raise ModellegoError(f"the members take {flops:,} FLOPs per sample, over --max-flops {max_flops:,} (the "
                             f"components cut for it stay in the box); raise --max-flops or ask for fewer classes")
    used_calibration = None
    if len(members) == 1:  # one registered file answers exactly these classes: it is the model
        brick, _ = open_model(members[0].path)
        write(brick.model, target, brick.manifest)
    else:
        result = assemble([member.path for member in members], target, mode=mode, calibration=calibration,
                          data=data, progress=progress, device=device)
        used_calibration = result.calibration.value
    report = evaluate_file(target, data=data, device=device)
    described = describe(target)
    described.accuracy = report["accuracy"]
    entry = box.add([described])[0]
    expected = chosen.expected_accuracy(members)
    return Built(chosen, target, report["accuracy"], report["samples"], expected, report["params"],
                 report["flops"], members, entry, made, time.perf_counter() - started, used_calibration)


def _cut(box: Catalogue, step: Step, samples_per_class: int, data: "DataOptions | None", progress: bool, device: Any,
         made: list[Entry]) -> Entry:
    """Profile (when no registered profile holds the classes) and disassemble `step`'s classes from its source,
    into the box's folder, registering each file as it is written."""
    from modellego.commands.disassemble import disassemble
    from modellego.commands.profile import profile

    source = step.source
    positions = [source.classes.index(key) for key in step.classes]
    box.files.mkdir(parents=True, exist_ok=True)
    stem = f"{Path(source.path).stem.removesuffix('.safetensors')}.{slug(step.classes)}"
    profile_entry = step.profile
    if profile_entry is None:
        profile_path = free_path(box.files, stem, ".profile.safetensors")
        profile(source.path, profile_path, samples_per_class, classes=positions, data=data, progress=progress,
                device=device)
        profile_entry = box.add([profile_path])[0]
        made.append(profile_entry)
    part_path = free_path(box.files, stem, ".safetensors")
    disassemble(source.path, profile_entry.path, positions, part_path, evaluate=True, data=data, progress=progress,
                device=device)
    part = box.add([part_path])[0]
    made.append(part)
    return part
