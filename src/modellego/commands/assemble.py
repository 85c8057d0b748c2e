"""`modellego assemble`: components (even of models trained on different datasets) into one model answering the
union of their classes, scaled and calibrated without gradients — for any model kind."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from modellego.commands.common import Device, FilePath, open_model, runs_models, runtime_options, union, write
from modellego.core.assemble import AssemblyMode, check_members
from modellego.core.evaluate import count_params
from modellego.core.gates import DEFAULT_TEMPERATURE, GATES, PER_SAMPLE, STORED_AS, Calibration, stored_rows
from modellego.core.hashing import weights_hash
from modellego.core.joint import JOINT, JOINT_RIDGE
from modellego.data.task import DataOptions
from modellego.errors import ModellegoError
from modellego.io.atomic import check_output_path
from modellego.io.manifest import Brick, Manifest
from modellego.kinds import ModelKind, kind_of

FIT_PER_CLASS = 1000     # own training samples per class a gate's statistics are fitted on
HELD_OUT_PER_CLASS = 100  # own training samples per class, never fitted on, that `auto` compares calibrations on


@dataclass
class Assembled:
    """`assemble`'s result: the assembly (model and manifest), its mode, the calibration it uses and, for `auto`,
    how it was chosen (every candidate's held-out accuracy)."""

    brick: Brick
    mode: AssemblyMode
    calibration: Calibration
    choice: dict | None = None
    members_params: int = 0  # the components' own parameters and FLOPs, summed: what they cost side by side
    members_flops: int = 0


def own_split(kind: ModelKind, train: Any, fit_per_class: int = FIT_PER_CLASS,
              held_per_class: int = HELD_OUT_PER_CLASS, seed: int = 0) -> tuple[Any, Any]:
    """A component's own training samples split per class into (fit, held-out), disjoint, drawn with `seed`: a
    gate is fitted on the first, `auto` judges on the second. A class with few samples keeps a tenth held out."""
    generator = torch.Generator().manual_seed(seed)
    fit, held = [], []
    for label in range(len(train.classes)):
        members = torch.nonzero(train.targets == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        cut = min(held_per_class, max(1, len(members) // 10)) if len(members) > 1 else 0
        held.append(members[:cut])
        fit.append(members[cut:cut + fit_per_class])
    return (kind.subset(train, kind.positions(train, torch.cat(fit).sort().values)),
            kind.subset(train, kind.positions(train, torch.cat(held).sort().values)))


def choose_calibration(members: Sequence[Brick], splits: Sequence[tuple[Any, Any]], targets: Sequence[int],
                       temperature: float = DEFAULT_TEMPERATURE, progress: bool = False,
                       candidates: Sequence[str] | None = None) -> tuple[str, dict]:
    """The `auto` protocol: every candidate calibration (by default every one the members' kind has, the paper's
    scaling first) is fitted on each member's own fit samples only, then the assembly answers the union of all
    members' own held-out training samples (each labelled with its class in the assembly); the candidate with the
    highest accuracy wins (ties: the earlier candidate). No test sample is used. The default candidates are the
    data-free ones: a calibration that stores rows of training images (PER_SAMPLE) is never chosen for the user.
    Returns the winner and a record (accuracies, and the winner's `stats`)."""
    kind = kind_of(members[0].manifest.architecture)
    spec = members[0].manifest.input
    if candidates is None:
        candidates = [name for name in ("scale", *GATES, JOINT) if name in kind.calibrations and name not in PER_SAMPLE]
    offsets = [0]
    for _, manifest in members:
        offsets.append(offsets[-1] + len(manifest.classes))
    helds = [held for _, held in splits]
    labels = torch.cat([torch.tensor(targets)[offsets[c] + held.targets] for c, held in enumerate(helds)])
    held_out = kind.union(helds, labels)
    models = [model for model, _ in members]
    accuracies: dict[str, float] = {}
    fitted: dict[str, list] = {}
    for candidate in candidates:
        calibration = Calibration.parse(candidate)
        stats = None
        try:
            if calibration == Calibration.JOINT:
                stats = fitted[candidate] = kind.fit_joint(models, [fit for fit, _ in splits], targets, spec)
            elif calibration.is_gate:
                stats = fitted[candidate] = [kind.fit_gate(calibration, model, fit, spec)
                                             for model, (fit, _) in zip(models, splits)]
        except ModellegoError:  # a calibration this architecture cannot have (no layer to compare patterns on)
            continue
        model = kind.assemble(models, spec, AssemblyMode.PARALLEL, targets, calibration, stats, temperature)
        logits, _ = kind.predict(model, held_out)
        accuracies[candidate] = (logits.argmax(1) == labels).float().mean().item()
    best = max(accuracies, key=lambda name: (accuracies[name], -list(candidates).index(name)))
    record = {"protocol": "own held-out training images", "chosen": best, "held_out_accuracy": accuracies,
              "held_out_samples": int(len(labels))}
    if best in fitted:
        record["stats"] = fitted[best]
    record["fitted"] = fitted  # every gate's statistics, for callers comparing them (not written to files)
    return best, record


def scaled(member: Brick, samples: Any, progress: bool = False) -> Brick:
    """Parameter scaling on the member's own task data; the factors go into its provenance."""
    kind = kind_of(member.manifest.architecture)
    model, factors = kind.scale(member.model, samples, member.manifest.input, progress)
    manifest = copy.deepcopy(member.manifest)
    manifest.provenance["scaled"] = {"factors": factors, "samples": len(samples)}
    return Brick(model, manifest)


def assembly(members: Sequence[Brick], mode: AssemblyMode | str | None = None, scale_logits: bool = True,
             data: DataOptions | None = None, progress: bool = False, calibration: Calibration | str | None = None,
             temperature: float = DEFAULT_TEMPERATURE, store_training_data: bool = False) -> Brick:
    """One model answering the union of the members' classes (in order; a class shared by two members from the
    same dataset gets one output, the max of their logits), calibrated by `calibration` (README, "Calibrated
    assembly"): "none"; "scale" (the paper's; each member not scaled yet is scaled on its own task's training
    data); a gate, fitted on each member's own training samples; or "auto", the calibration that answers the
    members' own held-out training samples best. Without `calibration`, `scale_logits` chooses between "auto"
    and "none". `mode`: the kind's default (padded for CNNs, parallel for GCNs) unless given. A calibration that
    stores rows of the components' training images (`knn`, `nearest`) needs `store_training_data`."""
    return _assembled(members, mode, scale_logits, data, progress, calibration, temperature,
                      store_training_data).brick


def check_storage(calibration: Calibration | str | None, store_training_data: bool) -> None:
    """Refuse, before any work, a calibration that would put training data in the file without the user's word."""
    if calibration is None or store_training_data:
        return
    chosen = Calibration.parse(calibration)
    if chosen.stores_samples:
        raise ModellegoError(f"--calibration {chosen.value} stores rows of the components' training images in the "
                             f"file (up to {FIT_PER_CLASS:,} per class: {STORED_AS[chosen.value]}); add "
                             "--store-training-data to allow it, or choose a data-free calibration (auto, joint, "
                             "scale, msp, energy, mahalanobis, pattern)")


def _assembled(members: Sequence[Brick], mode: AssemblyMode | str | None, scale_logits: bool,
               data: DataOptions | None, progress: bool, calibration: Calibration | str | None,
               temperature: float, store_training_data: bool = False) -> Assembled:
    """`assembly`, with the mode and calibration it used and how `auto` chose."""
    members = [Brick(*member) for member in members]
    check_members(len(members))
    given = [weights_hash(model) for model, _ in members]  # before scaling: the files' weights, as the box knows them
    kinds = {kind_of(member.manifest.architecture).name for member in members}
    if len(kinds) > 1:
        raise ModellegoError(f"the components are models of different kinds ({', '.join(sorted(kinds))}); "
                             "assemble components of one kind")
    kind = kind_of(members[0].manifest.architecture)
    mode = AssemblyMode.parse(mode) if mode is not None else kind.default_mode
    kind.check_mode(mode)
    calibration = Calibration.parse(calibration or ("auto" if scale_logits else "none"))
    kind.check_calibration(calibration)
    check_storage(calibration, store_training_data)
    first = members[0].manifest.input
    for _, manifest in members[1:]:
        if manifest.input.describe() != first.describe():
            raise ModellegoError(f"components take different inputs ({first.describe()} and "
                                 f"{manifest.input.describe()}); assemble components of the same input")
    classes, targets = union([manifest for _, manifest in members])
    record: dict = {}
    stats = None
    if calibration != Calibration.NONE:  # the gates weigh the scaled components: scaling fixes each one's bias
        members = [member if "scaled" in member.manifest.provenance
                   else scaled(member, kind.data(member.manifest, "train", data), progress)
                   for member in members]
    if calibration.is_gate or calibration in (Calibration.AUTO, Calibration.JOINT):
        splits = [own_split(kind, kind.data(member.manifest, "train", data)) for member in members]
        if calibration == Calibration.AUTO:
            chosen, record = choose_calibration(members, splits, targets, temperature, progress)
            calibration = Calibration.parse(chosen)
            stats = record.pop("stats", None)
            record.pop("fitted")
        elif calibration == Calibration.JOINT:
            stats = kind.fit_joint([model for model, _ in members], [fit for fit, _ in splits], targets, first)
        else:
            stats = [kind.fit_gate(calibration, model, fit, first) for (model, _), (fit, _) in zip(members, splits)]
        record.update(fit_samples=[len(fit) for fit, _ in splits])
        if calibration == Calibration.JOINT:
            record["joint_head"] = {"layers": stats["layers"], "features": int(stats["weight"].shape[1]),
                                    "ridge": JOINT_RIDGE}
    model = kind.assemble([model for model, _ in members], first, mode, targets, calibration, stats, temperature)
    architecture = kind.assembly_architecture(members, mode, model, len(classes))
    stored = stored_rows(calibration, stats if calibration.is_gate else None)
    provenance = {"assembled": {"mode": mode.value, "scaled": calibration != Calibration.NONE,
                                "calibration": calibration.value,
                                **({"stored_training_data": stored} if stored else {}),
                                **({"calibration_choice": record} if record else {}),
                                "components": [{"hash": weights_hash(m), "classes": mf.class_names,
                                                "provenance": mf.provenance, "metrics": mf.metrics,
                                                **({"given_hash": before} if before != weights_hash(m) else {})}
                                               for (m, mf), before in zip(members, given)]}}
    brick = Brick(model, Manifest(architecture=architecture, classes=classes, input=first, kind="assembly",
                                  provenance=provenance))
    return Assembled(brick, mode, calibration, record or None, sum(count_params(m) for m, _ in members),
                     sum(kind.count_flops(m, mf.input) for m, mf in members))


@runs_models
def assemble(paths: Sequence[FilePath], out: FilePath, mode: AssemblyMode | str | None = None,
             scale_logits: bool = True, data: DataOptions | None = None, progress: bool = True,
             calibration: Calibration | str | None = None, temperature: float = DEFAULT_TEMPERATURE,
             store_training_data: bool = False, device: Device = "auto", precision: str | None = None, workers: int | None = None) -> Assembled:
    """Assemble component files into one model answering the union of their classes, calibrated by
    `calibration` (see `assembly`), and save it; a gate's statistics travel in the file (rows of training images
    only for `knn` / `nearest`, which need `store_training_data`). The members run on
    `device`; `precision` applies to gate fitting and the choice of calibration, never to the scaling factors;
    `workers` to data loading."""
    check_output_path(out, inputs=list(paths))
    check_members(len(paths))
    if mode is not None:
        AssemblyMode.parse(mode)
    if calibration is not None:
        Calibration.parse(calibration)
    members = [open_model(path, device)[0] for path in paths]
    kind_of(members[0].manifest.architecture).check_options({
        "--image-size": data is not None and data.image_size is not None,
        "--no-verify": data is not None and not data.verify, **runtime_options(precision, workers)})
    result = _assembled(members, mode, scale_logits, data, progress, calibration, temperature, store_training_data)
    write(result.brick.model, out, result.brick.manifest)
    return result
