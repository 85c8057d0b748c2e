"""Which registered files make a model for asked classes: `plan` covers the classes, in the order asked, with
contiguous runs answered by one model each — a registered component (or model) whose classes are exactly the
run, else a new component cut from a registered source model that holds the run (with a registered profile of
it holding the run's classes, or profiling them first).

The cover is the cheapest under (new cuts, FLOPs, components): reuse first (nothing is cut again), then the
fewest FLOPs, then the fewest components; ties go to the earlier entry. A new cut's FLOPs are unknown before it
is made, so the plan counts its source's (an upper bound). Every member of an assembly takes the same input, so
the cover is searched among the files of each input (channels × size) and the cheapest complete one wins; each
file normalises its own input, so different normalisations are no obstacle. Files whose bytes changed since
`add`, or that are gone, are never used (`Plan.unused` says which)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from modellego.errors import ModellegoError

if TYPE_CHECKING:
    from modellego.box.catalogue import Catalogue, Entry

ClassKey = tuple[str, str]  # (dataset, name)
MEMBER_KINDS = ("model", "component")  # what a build may use as it is (assemblies are not nested)


@dataclass
class Step:
    """One member of the planned model: `use` (a registered file answering exactly `classes`), or a component to
    cut from `source` with `profile` (None: profile the classes first)."""

    classes: list[ClassKey]
    use: "Entry | None" = None
    source: "Entry | None" = None
    profile: "Entry | None" = None

    @property
    def flops(self) -> int:
        """Its FLOPs per sample: the registered file's, or for a new cut its source's (an upper bound)."""
        return int((self.use or self.source).flops or 0)

    def describe(self) -> str:
        names = ", ".join(f"{dataset}:{name}" for dataset, name in self.classes)
        if self.use is not None:
            accuracy = "" if self.use.accuracy is None else f", {100 * self.use.accuracy:.2f}% on its task"
            return f"{names} ← {self.use.label()}: {self.use.flops:,} FLOPs{accuracy}"
        profile = f"with {self.profile.label()}" if self.profile is not None else "profiling these classes first"
        return f"{names} ← cut from {self.source.label()} ({self.source.flops:,} FLOPs before the cut), {profile}"


@dataclass
class Plan:
    """The classes asked (as the box spells them, in order) and the members that answer them, in that order."""

    classes: list[ClassKey]
    steps: list[Step]
    unused: dict[int, str] = field(default_factory=dict)  # entry id → why not ('changed', 'missing')

    @property
    def cuts(self) -> int:
        return sum(step.use is None for step in self.steps)

    @property
    def flops(self) -> int:
        """The members' FLOPs per sample (new cuts counted at their source's)."""
        return sum(step.flops for step in self.steps)

    def expected_accuracy(self, members: Sequence["Entry | None"] | None = None) -> float | None:
        """The members' own accuracies on their tasks (`members`, one per step; by default the registered files
        the steps use), weighted by their classes; None while one is unknown."""
        members = [step.use for step in self.steps] if members is None else members
        accuracies = [member.accuracy if member is not None else None for member in members]
        if any(accuracy is None for accuracy in accuracies):
            return None
        return sum(a * len(step.classes) for a, step in zip(accuracies, self.steps)) / len(self.classes)

    def lines(self) -> list[str]:
        """The plan as a user reads it, one line per member (and per file it leaves out)."""
        head = (f"{len(self.classes)} classes from {len(self.steps)} member{'s' * (len(self.steps) != 1)}"
                f" ({self.cuts} to cut), at most {self.flops:,} FLOPs per sample:")
        lines = [head] + [f"  {k}. {step.describe()}" for k, step in enumerate(self.steps, 1)]
        lines += [f"  (entry {entry_id} not used: its file is {why})" for entry_id, why in sorted(self.unused.items())]
        expected = self.expected_accuracy()
        if expected is not None:
            lines.append(f"  expected accuracy ≈ {100 * expected:.2f}% (its members' own, weighted by classes)")
        return lines

    def record(self) -> dict:
        return {"classes": [list(key) for key in self.classes], "cuts": self.cuts, "flops": self.flops,
                "expected_accuracy": self.expected_accuracy(), "unused": self.unused,
                "steps": [{"classes": [list(key) for key in step.classes],
                           "use": None if step.use is None else step.use.id,
                           "source": None if step.source is None else step.source.id,
                           "profile": None if step.profile is None else step.profile.id} for step in self.steps]}


def parse_classes(text: str | Sequence[str]) -> list[tuple[str | None, str]]:
    """'fashion-mnist:Trouser,digits:3' (or a list of such items) as (dataset, name) pairs; a name without a
    dataset is (None, name). Empty lists and classes asked twice are refused."""
    items = [item.strip() for item in text.split(",")] if isinstance(text, str) else [str(item).strip() for item in text]
    items = [item for item in items if item]
    if not items:
        raise ModellegoError('no classes asked; give --classes "DATASET:CLASS,...", e.g. "fashion-mnist:Trouser,digits:3"')
    asked: list[tuple[str | None, str]] = []
    for item in items:
        dataset, colon, name = item.partition(":")
        pair = (dataset.strip(), name.strip()) if colon else (None, item)
        if not pair[1] or pair[0] == "":
            raise ModellegoError(f"{item!r} is not DATASET:CLASS (e.g. fashion-mnist:Trouser)")
        if pair in asked:
            raise ModellegoError(f"class {item!r} is asked twice; name each class once")
        asked.append(pair)
    return asked


def _resolve(asked: list[tuple[str | None, str]], available: list[ClassKey]) -> list[ClassKey]:
    """The asked classes as the box spells them: dataset case-insensitively, the name exactly, else
    case-insensitively when that is unique; a class nothing holds is one line listing what the box can give."""
    resolved: list[ClassKey] = []
    missing: list[str] = []
    for dataset, name in asked:
        matches = [key for key in available if (dataset is None or key[0].lower() == dataset.lower())
                   and key[1] == name]
        if not matches:
            matches = [key for key in available if (dataset is None or key[0].lower() == dataset.lower())
                       and key[1].lower() == name.lower()]
        if len(matches) > 1:
            spelled = ", ".join(f"{d}:{n}" for d, n in matches[:6])
            raise ModellegoError(f"class {name!r} is {spelled} in the box; ask for one as DATASET:CLASS")
        if not matches:
            missing.append(name if dataset is None else f"{dataset}:{name}")
        else:
            resolved.append(matches[0])
    if missing:
        raise ModellegoError(f"no registered model holds {', '.join(missing)}; the box can give "
                             f"{_offer(available)} (`modellego box add` a model of the others)")
    if len(set(resolved)) < len(resolved):
        raise ModellegoError("two asked classes name the same class of the box; name each class once")
    return resolved


def _offer(available: list[ClassKey], shown: int = 12) -> str:
    """What the box can give, per dataset: 'digits (10: 0, 1, ...)'."""
    if not available:
        return "nothing yet (it holds no model or component)"
    by_dataset: dict[str, list[str]] = {}
    for dataset, name in available:
        by_dataset.setdefault(dataset, []).append(name)
    parts = []
    for dataset, names in sorted(by_dataset.items()):
        listed = ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")
        parts.append(f"{dataset} ({len(names)}: {listed})")
    return "; ".join(parts)


def _input_key(entry: "Entry") -> str:
    """What members of one assembly share: the model kind (one assembly holds one kind) and the input, less its
    normalisation (each file normalises its own input)."""
    from modellego.kinds import kind_for_request

    kind = kind_for_request(entry.builder or "", entry.classes[0][0] if entry.classes else "").name
    return json.dumps({"kind": kind, **{key: value for key, value in (entry.input or {}).items()
                                        if key not in ("mean", "std")}}, sort_keys=True)


def _describe_input(entry: "Entry") -> str:
    spec = entry.input or {}
    if spec.get("kind") == "graph":
        return f"graph nodes with {spec.get('features')} features"
    size = spec.get("size") or ["?", "?"]
    return f"{spec.get('channels')}×{size[0]}×{size[1]}"


def plan(box: "Catalogue", classes: str | Sequence[str], max_flops: int | None = None) -> Plan:
    """Cover `classes` (see `parse_classes`) with what `box` holds (see the module docstring). Registered files
    over `max_flops` are not used as they are; a class no registered model holds, or classes that only models of
    different inputs hold, is a one-line error naming what the box can give or the inputs."""
    if max_flops is not None and max_flops <= 0:
        raise ModellegoError(f"--max-flops must be a positive number of FLOPs per sample, got {max_flops}")
    asked = parse_classes(classes)
    everything = list(box.entries())  # each read checks the row and its path: once
    members = [entry for entry in everything if entry.kind in MEMBER_KINDS]
    keys = [key for entry in members for key in entry.classes]
    available = list(dict.fromkeys(keys))
    wanted = _resolve(asked, available)
    relevant = [entry for entry in members if set(entry.classes) & set(wanted)]
    profiles = [entry for entry in everything if entry.kind == "profile"
                and any(entry.source_hash == member.weights_hash for member in relevant)]
    unused = box.verify(relevant + profiles)
    unused = {entry_id: state for entry_id, state in unused.items() if state != "ok"}
    relevant = [entry for entry in relevant if entry.id not in unused]
    profiles = [entry for entry in profiles if entry.id not in unused]
    best: Plan | None = None
    best_cost: tuple | None = None
    keys = {entry.id: _input_key(entry) for entry in relevant}
    for input_key in dict.fromkeys(keys.values()):
        group = [entry for entry in relevant if keys[entry.id] == input_key]
        found = _cover(wanted, group, profiles, max_flops)
        if found is not None and (best_cost is None or found[0] < best_cost):
            best_cost, best = found[0], Plan(wanted, found[1], unused)
    if best is None:
        raise ModellegoError(_why_uncovered(wanted, relevant, unused, max_flops))
    return best


def _cover(wanted: list[ClassKey], group: list["Entry"], profiles: list["Entry"],
           max_flops: int | None) -> tuple[tuple, list[Step]] | None:
    """The cheapest cover of `wanted` by contiguous runs (dynamic programming from the end), or None."""
    count = len(wanted)
    best: list[tuple[tuple, list[Step]] | None] = [None] * count + [((0, 0, 0), [])]
    for start in range(count - 1, -1, -1):
        options: list[tuple[tuple, int, Step]] = []
        for entry in group:
            stop = start + len(entry.classes)
            if entry.classes == wanted[start:stop] and (max_flops is None or (entry.flops or 0) <= max_flops):
                options.append(((0, entry.flops or 0, 1), stop, Step(list(entry.classes), use=entry)))
            if entry.kind == "model" and wanted[start] in entry.classes:
                stop = start
                while stop < count and wanted[stop] in entry.classes:
                    stop += 1
                    run = wanted[start:stop]
                    options.append(((1, entry.flops or 0, 1), stop,
                                    Step(run, source=entry, profile=_profile_for(entry, run, profiles))))
        for cost, stop, step in options:
            rest = best[stop]
            if rest is None:
                continue
            total = tuple(a + b for a, b in zip(cost, rest[0]))
            if best[start] is None or total < best[start][0]:
                best[start] = (total, [step] + rest[1])
    return best[0]


def _profile_for(source: "Entry", run: list[ClassKey], profiles: list["Entry"]) -> "Entry | None":
    """A registered profile of `source` holding every class of `run` (the first added), or None."""
    return next((profile for profile in profiles if profile.is_profile_of(source.weights_hash, run)), None)


def _why_uncovered(wanted: list[ClassKey], relevant: list["Entry"], unused: dict[int, str],
                   max_flops: int | None) -> str:
    """One line: why no cover exists (a class only changed files hold, or inputs that differ)."""
    for key in wanted:
        if not any(key in entry.classes for entry in relevant):
            why = f"; entries {', '.join(map(str, sorted(unused)))} hold it but their files changed or are gone " \
                  "(`modellego box verify`)" if unused else ""
            return f"no usable registered model holds {key[0]}:{key[1]}{why}"
    inputs: dict[str, list[str]] = {}
    for key in wanted:
        for entry in relevant:
            if key in entry.classes:
                inputs.setdefault(_describe_input(entry), []).append(f"{key[0]}:{key[1]}")
                break
    if len(inputs) > 1:
        shown = "; ".join(f"{', '.join(names[:4])} from models of {spec} input" for spec, names in inputs.items())
        return (f"the asked classes come from models of different inputs ({shown}); an assembly takes one input: "
                "ask for classes of models with the same channels and size")
    if len({_input_key(entry) for entry in relevant}) > 1:
        return ("the asked classes come from models of different kinds (e.g. a CNN and a Transformer); an "
                "assembly holds one kind: ask for classes that models of one kind hold")
    if max_flops is not None:
        return f"no cover of the asked classes fits --max-flops {max_flops:,}; raise it or register smaller components"
    return ("the asked classes are held only by components that answer other classes too, in another order; "
            "`modellego box add` the models they were cut from, so that the box can cut these classes")


def slug(classes: Sequence[ClassKey], limit: int = 48) -> str:
    """A file-name part for classes: their names' letters and digits, then a short digest of the whole list."""
    import hashlib
    import re

    names = "_".join(re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-") or "class" for _, name in classes)
    digest = hashlib.sha256(json.dumps([list(key) for key in classes]).encode()).hexdigest()[:8]
    return f"{names[:limit].rstrip('_-')}-{digest}"


def free_path(folder: Path, stem: str, suffix: str) -> Path:
    """`folder/stem.suffix`, or with -2, -3, ... when that name is taken."""
    candidate = folder / f"{stem}{suffix}"
    number = 2
    while candidate.exists():
        candidate = folder / f"{stem}-{number}{suffix}"
        number += 1
    return candidate
