"""The pipeline: files, manifests, provenance, datasets by name and evaluation tables around the method's core.
Each `modellego` command (and each demo step) is one function here; the CLI only parses and prints."""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from modellego import data as datasets, distributed
from modellego.assembly import MODES, assemble as assemble_models, scale as scale_model
from modellego.gates import CALIBRATIONS, DEFAULT_TEMPERATURE, GATES, fit as fit_gate
from modellego.data.subsets import SampleSubset, per_class_slice, resolve_classes
from modellego.data.task import task_data
from modellego.disassembly import disassemble_with_cut
from modellego.errors import ModellegoError
from modellego.evaluate import count_flops, count_params, evaluate, predict, report, source_baselines
from modellego.graph import ChannelGraph
from modellego.masks import DEFAULT_FLATTEN, FLATTEN_RULES, PAPER, ComponentMasks, Thresholds, locate
from modellego.modelfile import Brick, ClassRef, Manifest, atomic_write, check_output_path, load, read_manifest, save, weights_hash
from modellego.profiles import Profile, profile as profile_model
from modellego.reconstruct import RIDGE, reconstruct_component
from modellego.search import GRID_STEP, SearchResult, search_grid, search_thresholds, validation_data
from modellego.train import finetune as finetune_model, train_model

if TYPE_CHECKING:  # matplotlib is imported only by the commands that draw
    from matplotlib.figure import Figure

    from modellego import viz

AGREEMENT_GAP = 0.10  # a component this far below its restricted source on the profile's images gets a warning
FilePath = str | os.PathLike


@dataclass
class DataOptions:
    """Where a command reads a model's data: the folder (`root`), an image size for resizable datasets, and
    whether CIFAR checksums are verified. The defaults are those recorded in the model file."""

    root: FilePath | None = None
    image_size: int | None = None
    verify: bool = True

    def of(self, manifest: Manifest | Sequence[ClassRef], split: str, **extra) -> Dataset:
        return task_data(manifest, split, root=self.root, image_size=self.image_size, verify=self.verify, **extra)


# --- in-memory steps on (model, manifest) pairs ---------------------------------------------------------------

def _write(model: nn.Module, out: FilePath, manifest: Manifest) -> None:
    """Save a model file; under torchrun only the first process writes (all hold the same model)."""
    if distributed.is_main():
        save(model, out, manifest)


def component(source: Brick, masks: ComponentMasks, classes: str | Sequence[str | int],
              reconstruct_images: Dataset | torch.Tensor | None = None, ridge: float = RIDGE,
              graph: ChannelGraph | None = None, flatten: str = "any-feature") -> Brick:
    """The component of `source` for `classes` (core `disassemble`), with a manifest recording its lineage:
    the source's hash and provenance, the task, α/β and the profile's hash. With `reconstruct_images`, its
    layers are re-fitted to the source's outputs on them (`reconstruct`), recorded in the provenance too.
    `graph`: the ChannelGraph `locate` used on `source.model`; `flatten`: the rule `locate` used, recorded."""
    if [ref.name for ref in source.manifest.classes] != masks.classes:
        raise ModellegoError("the masks were located for a model with other classes than this manifest describes")
    task = resolve_classes(masks.classes, classes, "the model's classes")
    spec = source.manifest.input
    model, cut = disassemble_with_cut(source.model, masks, task, (spec.channels, *spec.size), graph)
    architecture = dict(source.manifest.architecture, num_classes=len(task))
    provenance = {"disassembled": {
        "source_hash": weights_hash(source.model), "source_provenance": source.manifest.provenance,
        "task": [source.manifest.classes[k].name for k in task], "task_positions": task,
        "profile_hash": masks.profile_hash, **masks.settings}}
    if flatten != "any-feature":  # today's rule is recorded by its absence, so pure components stay byte-equal
        provenance["disassembled"]["flatten"] = flatten
    if reconstruct_images is not None:
        done = reconstruct_component(model, source.model, cut, reconstruct_images, ridge)
        provenance["disassembled"]["reconstruction"] = done.record()
    return Brick(model, Manifest(architecture=architecture, classes=[source.manifest.classes[k] for k in task],
                                 input=spec, kind="component", provenance=provenance))


def scaled(member: Brick, data: Dataset, progress: bool = False) -> Brick:
    """Parameter scaling (core `scale`) on the member's own task data; the factors go into its provenance."""
    spec = member.manifest.input
    model, factors = scale_model(member.model, data, (spec.channels, *spec.size), progress)
    manifest = copy.deepcopy(member.manifest)
    manifest.provenance["scaled"] = {"factors": factors, "samples": len(data)}
    return Brick(model, manifest)


def assembly(members: Sequence[Brick], mode: str = "padded", scale_logits: bool = True,
             data: DataOptions | None = None, progress: bool = False, calibration: str | None = None,
             temperature: float = DEFAULT_TEMPERATURE) -> Brick:
    """One model answering the union of the members' classes (in order; a class shared by two members from the
    same dataset gets one output, the max of their logits), calibrated by `calibration` (README, "Calibrated
    assembly"): "none"; "scale" (the paper's; each member not scaled yet is scaled on its own task's training
    data); a gate (gates.py), fitted on each member's own training images; or "auto", the calibration that
    answers the members' own held-out training images best. Without `calibration`, `scale_logits` chooses
    between "auto" and "none"."""
    if mode not in MODES:
        raise ModellegoError(f"unknown assembly mode {mode!r}; choose 'padded' or 'parallel'")
    calibration = calibration or ("auto" if scale_logits else "none")
    if calibration not in (*CALIBRATIONS, "auto"):
        raise ModellegoError(f"unknown calibration {calibration!r}; choose one of {', '.join(CALIBRATIONS)} or auto")
    members = [Brick(*member) for member in members]
    if len(members) < 2:
        raise ModellegoError("assembling needs at least two components")
    first = members[0].manifest.input
    for _, manifest in members[1:]:
        spec = manifest.input
        if (spec.channels, spec.size) != (first.channels, first.size):
            raise ModellegoError(f"components take different inputs ({first.describe()} and {spec.describe()}); "
                                 "assemble components of the same input size and channels")
    data = data or DataOptions()
    example = (first.channels, *first.size)
    classes, targets = _union([manifest for _, manifest in members])
    record: dict = {}
    stats = None
    if calibration != "none":  # the gates weigh the scaled components: scaling fixes each one's own class bias
        members = [member if "scaled" in member.manifest.provenance
                   else scaled(member, data.of(member.manifest, "train"), progress) for member in members]
    if calibration in GATES or calibration == "auto":
        splits = [own_split(data.of(member.manifest, "train")) for member in members]
        if calibration == "auto":
            calibration, record = choose_calibration(members, splits, targets, temperature, progress)
            stats = record.pop("stats", None)
            record.pop("fitted")
        else:
            stats = [fit_gate(calibration, model, fit, example) for (model, _), (fit, _) in zip(members, splits)]
        record.update(fit_samples=[len(fit) for fit, _ in splits])
    model = assemble_models([model for model, _ in members], example, mode, targets,
                            calibration=calibration if calibration in GATES else None, stats=stats,
                            temperature=temperature)
    if mode == "parallel":
        architecture = {"builder": "parallel", "num_classes": len(classes),
                        "members": [dict(m.architecture, input=m.input.to_dict()) for _, m in members]}
    else:
        architecture = dict(members[0].manifest.architecture, num_classes=len(classes), merge_outputs=True)
    if calibration in GATES:
        architecture["gate"] = model.gate.config
    provenance = {"assembled": {"mode": mode, "scaled": calibration != "none", "calibration": calibration,
                                **({"calibration_choice": record} if record else {}),
                                "components": [{"hash": weights_hash(m), "classes": mf.class_names,
                                                "provenance": mf.provenance, "metrics": mf.metrics}
                                               for m, mf in members]}}
    return Brick(model, Manifest(architecture=architecture, classes=classes, input=first, kind="assembly",
                                 provenance=provenance))


FIT_PER_CLASS = 1000     # own training images per class a gate's statistics are fitted on
HELD_OUT_PER_CLASS = 100  # own training images per class, never fitted on, that `auto` compares calibrations on


def own_split(train_data: Dataset, fit_per_class: int = FIT_PER_CLASS, held_per_class: int = HELD_OUT_PER_CLASS,
              seed: int = 0) -> tuple[SampleSubset, SampleSubset]:
    """A component's own training images split per class into (fit, held-out), disjoint, drawn with `seed`: a
    gate is fitted on the first, `auto` judges on the second. A class with few images keeps a tenth held out."""
    generator = torch.Generator().manual_seed(seed)
    fit, held = [], []
    for label in range(len(train_data.classes)):
        members = torch.nonzero(train_data.targets == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        cut = min(held_per_class, max(1, len(members) // 10)) if len(members) > 1 else 0
        held.append(members[:cut])
        fit.append(members[cut:cut + fit_per_class])
    return (SampleSubset(train_data, torch.cat(fit).sort().values),
            SampleSubset(train_data, torch.cat(held).sort().values))


def choose_calibration(members: Sequence[Brick], splits: Sequence[tuple[Dataset, Dataset]], targets: Sequence[int],
                       temperature: float = DEFAULT_TEMPERATURE, progress: bool = False,
                       candidates: Sequence[str] = ("scale", *GATES)) -> tuple[str, dict]:
    """The `auto` protocol: every candidate calibration is fitted on each member's own fit images only, then the
    assembly answers the union of all members' own held-out training images (each labelled with its class in
    the assembly); the candidate with the highest accuracy wins (ties: the earlier candidate, the paper's
    first). No test image is used. Returns the winner and a record (accuracies, and the winner's `stats`)."""
    spec = members[0].manifest.input
    example = (spec.channels, *spec.size)
    offsets = [0]
    for _, manifest in members:
        offsets.append(offsets[-1] + len(manifest.classes))
    held_parts = [(held, offsets[c]) for c, (_, held) in enumerate(splits)]
    images = torch.cat([torch.stack([held[i][0] for i in range(len(held))]) for held, _ in held_parts])
    labels = torch.cat([torch.tensor([targets[offset + held[i][1]] for i in range(len(held))])
                        for held, offset in held_parts])
    accuracies: dict[str, float] = {}
    fitted: dict[str, list] = {}
    for candidate in candidates:
        models = [model for model, _ in members]
        if candidate == "scale":
            model = assemble_models(models, example, "parallel", targets)
        else:
            try:
                fitted[candidate] = [fit_gate(candidate, m, fit, example) for m, (fit, _) in zip(models, splits)]
            except ModellegoError:  # a gate this architecture cannot have (no layer to compare patterns on)
                continue
            model = assemble_models(models, example, "parallel", targets, calibration=candidate,
                                    stats=fitted[candidate], temperature=temperature)
        with torch.no_grad():
            predictions = torch.cat([model(batch).argmax(1) for batch in images.split(256)])
        accuracies[candidate] = (predictions == labels).float().mean().item()
    best = max(accuracies, key=lambda name: (accuracies[name], -list(candidates).index(name)))
    record = {"protocol": "own held-out training images", "chosen": best, "held_out_accuracy": accuracies,
              "held_out_samples": int(len(labels))}
    if best in fitted:
        record["stats"] = fitted[best]
    record["fitted"] = fitted  # every gate's statistics, for callers comparing them (not written to files)
    return best, record


def _union(manifests: list[Manifest]) -> tuple[list[ClassRef], list[int]]:
    classes: list[ClassRef] = []
    targets: list[int] = []
    for manifest in manifests:
        for ref in manifest.classes:
            if ref not in classes:
                classes.append(ref)
            targets.append(classes.index(ref))
    return classes, targets


# --- evaluation -------------------------------------------------------------------------------------------------

def assembly_base(manifest: Manifest) -> float | None:
    """The mean Base of the source models on an assembly's classes, from what each component recorded when it
    was disassembled (per class, weighted by test samples); None when a component did not record it."""
    total, weight = 0.0, 0
    for record in manifest.provenance.get("assembled", {}).get("components", []):
        metrics = record.get("metrics", {})
        per_class, counts = metrics.get("base_per_class"), metrics.get("test_samples_per_class")
        if not per_class or not counts:
            return None
        for name, value in per_class.items():
            total += value * counts[name]
            weight += counts[name]
    return total / weight if weight else None


def component_metrics(part: Brick, source: Brick, data: DataOptions | None = None, batch_size: int = 256) -> dict:
    """Test metrics recorded in a component's manifest: its accuracy and its source's Base / Restricted base
    on the task (per class too), so that assemblies can report the mean Base of their sources later."""
    test_data = (data or DataOptions()).of(part.manifest, "test")
    baselines = source_baselines(source.model, source.manifest, part.manifest.classes, test_data, batch_size)
    own = evaluate(part.model, test_data, batch_size)
    return {**baselines, "test_accuracy": own.accuracy, "params": count_params(part.model),
            "flops": count_flops(part.model, part.manifest.input)}


@dataclass
class ProfileSampleCheck:
    """A component and its source restricted to the task, on the task's profile images (training data)."""

    component_accuracy: float
    restricted_base: float
    samples: int


def profile_sample_accuracy(component_model: nn.Module, source: nn.Module, task_positions: list[int],
                            train_data: Dataset, class_profile: Profile, batch_size: int = 256) -> ProfileSampleCheck:
    """Accuracy of a component (outputs = the task, in order) and of `source` restricted to `task_positions` on
    the profile's images of the task; `train_data` is the training data the profile was computed on
    (positions = `profile.samples`). Cheap: at most the profile's N per class."""
    task = torch.tensor(task_positions)
    in_task = torch.full((len(class_profile.classes),), -1, dtype=torch.long)
    in_task[task] = torch.arange(len(task))
    labels = in_task[class_profile.sample_labels.long()]
    chosen = labels >= 0
    if not chosen.any():
        return ProfileSampleCheck(float("nan"), float("nan"), 0)
    subset = SampleSubset(train_data, class_profile.samples[chosen], labels[chosen])
    source_logits, labels = predict(source, subset, batch_size)
    component_logits, _ = predict(component_model, subset, batch_size)
    restricted = (source_logits[:, task].argmax(1) == labels).float().mean().item()
    own = (component_logits.argmax(1) == labels).float().mean().item()
    return ProfileSampleCheck(own, restricted, len(labels))


# --- one function per command -----------------------------------------------------------------------------------

@dataclass
class Trained:
    """`train`'s result: the model and manifest written, its test metrics, the number of training samples."""

    brick: Brick
    metrics: dict
    samples: int


def train(builder: str, dataset: str, out: FilePath, epochs: int = 3, classes: str | None = None, width: float = 1.0,
          lr: float = 1e-3, batch_size: int = 128, max_per_class: int | None = None, data: DataOptions | None = None,
          seed: int = 0, progress: bool = True, auto_batch: bool = False) -> Trained:
    """Train `builder` on `dataset` (or some of its classes), evaluate it on the test split, save it to `out`.
    A batch size too large for the memory available is refused before training, or lowered with `auto_batch`.
    A graph (`sbm`, `karate`, `cora`, ...) or `--model gcn` trains a GCN, full batch (batch_size is unused)."""
    if _graph_request(builder, dataset):
        return _graphs().train(builder, dataset, out, epochs, classes, width, lr, max_per_class, data, seed)
    data = data or DataOptions()
    check_output_path(out)
    train_data = datasets.load(dataset, "train", data.root, image_size=data.image_size, verify=data.verify)
    test_data = datasets.load(dataset, "test", data.root, image_size=data.image_size, verify=data.verify)
    if classes is not None:
        train_data = datasets.select_classes(train_data, classes)
        test_data = datasets.select_classes(test_data, classes)
    if max_per_class is not None:
        train_data = datasets.per_class_slice(train_data, max_per_class, seed)
    model, manifest = train_model(builder, train_data, epochs, width=width, lr=lr, batch_size=batch_size, seed=seed,
                                  progress=progress, auto_batch=auto_batch)
    metrics = report(model, manifest.input, test_data, progress=progress)
    manifest.metrics = {"test_accuracy": metrics["accuracy"], "params": metrics["params"], "flops": metrics["flops"]}
    _write(model, out, manifest)
    return Trained(Brick(model, manifest), metrics, len(train_data))


def evaluate_file(path: FilePath, dataset: str | None = None, classes: str | None = None,
                  data: DataOptions | None = None, batch_size: int = 256, max_per_class: int | None = None,
                  progress: bool = False) -> dict:
    """Evaluate a model file on the test split of its own task (or `dataset`, matched by class names)."""
    if _graph_file(path):
        return _graphs().evaluate_file(path, dataset, classes, data)
    model, manifest = load(path)
    test_data = (data or DataOptions()).of(manifest, "test", dataset=dataset, only=classes)
    if max_per_class:
        test_data = per_class_slice(test_data, max_per_class)
    result = report(model, manifest.input, test_data, batch_size, progress)
    result["data"] = test_data.name
    if manifest.kind == "assembly":
        result["base"] = assembly_base(manifest)
    return result


def compare(component_path: FilePath, source_path: FilePath, data: DataOptions | None = None, batch_size: int = 256,
            max_per_class: int | None = None, progress: bool = False) -> dict:
    """A component (or any model) against its source on the component's task test samples: Base (source,
    argmax over all its classes), Restricted base (source logits restricted to the task), and the component."""
    if _graph_file(component_path):
        return _graphs().compare(component_path, source_path, data)
    part, manifest = load(component_path)
    source, source_manifest = load(source_path)
    test_data = (data or DataOptions()).of(manifest, "test")
    if max_per_class:
        test_data = per_class_slice(test_data, max_per_class)
    baselines = source_baselines(source, source_manifest, manifest.classes, test_data, batch_size, progress)
    own = evaluate(part, test_data, batch_size, progress)
    return {**baselines, "accuracy": own.accuracy, "per_class": own.per_class,
            "params": count_params(part), "flops": count_flops(part, manifest.input),
            "source_params": count_params(source), "source_flops": count_flops(source, source_manifest.input),
            "samples": own.samples, "classes": manifest.class_names, "data": test_data.name}


def profile(model_path: FilePath, out: FilePath, samples_per_class: int = 50, dataset: str | None = None,
            data: DataOptions | None = None, batch_size: int = 64, progress: bool = True) -> Profile:
    """Profile a model file on its training data (or `dataset`'s, matched by class names) and save the profile."""
    if _graph_file(model_path):
        return _graphs().profile(model_path, out, samples_per_class, dataset, data)
    check_output_path(out, inputs=[model_path])
    model, manifest = load(model_path)
    train_data = (data or DataOptions()).of(manifest, "train", dataset=dataset)
    result = profile_model(model, train_data, samples_per_class=samples_per_class, batch_size=batch_size,
                           progress=progress)
    if distributed.is_main():
        result.save(out)
    return result


@dataclass
class Disassembled:
    """`disassemble`'s result: the component written, the α/β search when one ran, the agreement check on the
    profile's images, and test metrics when asked for (`evaluate=True`)."""

    brick: Brick
    source: Brick
    search: SearchResult | None = None
    check: ProfileSampleCheck | None = None
    metrics: dict = field(default_factory=dict)


def reconstruction_images(train_data: Dataset, class_profile: Profile, task: list[int],
                          samples_per_class: int | None = None, seed: int = 0) -> SampleSubset:
    """The training images reconstruction re-fits on: by default the profile's own images of the task's
    classes (no more data than profiling used); with `samples_per_class`, that many images of each task class
    drawn with `seed` from the training data (all of a class when it has fewer)."""
    if samples_per_class is None and class_profile.dataset == train_data.name:
        chosen = torch.isin(class_profile.sample_labels, torch.tensor(task))
        return SampleSubset(train_data, class_profile.samples[chosen].sort().values)
    count = samples_per_class or class_profile.samples_per_class
    generator = torch.Generator().manual_seed(seed)
    picked = []
    for label in task:
        members = torch.nonzero(train_data.targets == label).flatten()
        picked.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return SampleSubset(train_data, torch.cat(picked).sort().values)


def disassemble(model_path: FilePath, profile_path: FilePath, classes: str | Sequence[str | int], out: FilePath,
                thresholds: Thresholds = PAPER, auto: bool = False, max_drop: float = 1.0, evaluate: bool = False,
                data: DataOptions | None = None, seed: int = 0, progress: bool = True, reconstruct: bool = True,
                reconstruct_samples: int | None = None, flatten: str = DEFAULT_FLATTEN,
                ridge: float = RIDGE, grid_step: float = GRID_STEP) -> Disassembled:
    """Cut the component for `classes` out of a model file with its profile and save it: the paper's α/β (or
    `thresholds`), or with `auto` the smallest component within `max_drop` points of the restricted base on
    held-out training images. With `reconstruct` (the default), the component's layers are re-fitted without
    gradients to the source's outputs on the profile's images of the task (or `reconstruct_samples` training
    images per class); `reconstruct=False` is the paper's pure method. `flatten` chooses the rule at a flatten
    (see `locate`); `grid_step`, the spacing of `auto`'s α/β grid. Warns when the component is far below its
    source on the profile's images.
    With `evaluate`, the test-split metrics (Base, Restricted base, accuracy) are measured and recorded."""
    alphas, betas = search_grid(grid_step)
    if _graph_file(model_path):
        if grid_step != GRID_STEP:
            raise ModellegoError("the grid step of --auto applies to image models only; drop it for a graph model")
        return _graphs().disassemble(model_path, profile_path, classes, out, thresholds, auto, max_drop, evaluate, data)
    data = data or DataOptions()
    if flatten not in FLATTEN_RULES:
        raise ModellegoError(f"unknown flatten rule {flatten!r}; choose {' or '.join(FLATTEN_RULES)}")
    if reconstruct_samples is not None and reconstruct_samples < 1:
        raise ModellegoError(f"reconstruct_samples must be at least 1, got {reconstruct_samples}")
    if not ridge > 0:
        raise ModellegoError(f"the ridge must be positive, got {ridge}")
    check_output_path(out, inputs=[model_path, profile_path])
    source = load(model_path)
    class_profile = Profile.load(profile_path)
    class_profile.check_model(source.model)
    task = resolve_classes(class_profile.classes, classes, "the model's classes")
    train_data = data.of(source.manifest, "train")
    images = reconstruction_images(train_data, class_profile, task, reconstruct_samples, seed) if reconstruct else None
    spec = source.manifest.input
    graph = ChannelGraph(source.model, (spec.channels, *spec.size))  # traced once: locate, search, disassemble
    search = None
    if auto:
        validation = validation_data(train_data, task, class_profile.samples, 0.1, seed)
        search = search_thresholds(source.model, class_profile, task, validation, max_drop, alphas, betas,
                                   progress=progress, reconstruct_images=images, ridge=ridge, flatten=flatten,
                                   graph=graph)
        thresholds = search.thresholds
    masks = locate(source.model, class_profile, **thresholds.as_dict(), graph=graph, flatten=flatten)
    part = component(source, masks, task, images, ridge, graph, flatten)
    if search is not None:
        part.manifest.provenance["disassembled"]["auto"] = {
            "max_drop": max_drop, "validation_samples": search.validation_samples,
            "validation_accuracy": search.accuracy, "validation_restricted_base": search.restricted_base,
            "met_target": search.met_target, "pareto": pareto_front(search.candidates),
            "evaluated": len(search.candidates), "grid": search.grid}
        if grid_step != GRID_STEP:  # the default is recorded by its absence, so earlier files stay byte-equal
            part.manifest.provenance["disassembled"]["auto"]["grid_step"] = grid_step
    check = None
    if class_profile.dataset == train_data.name:  # positions index this data only when it was profiled on it
        check = profile_sample_accuracy(part.model, source.model, task, train_data, class_profile)
        if check.component_accuracy < check.restricted_base - AGREEMENT_GAP:
            warnings.warn(f"the component gets {100 * check.component_accuracy:.2f}% of the task's {check.samples} "
                          f"profile images right, {100 * (check.restricted_base - check.component_accuracy):.1f} "
                          f"points below its source restricted to the task ({100 * check.restricted_base:.2f}%): "
                          "these α/β cut channels the task needs; try --auto", stacklevel=2)
    metrics = component_metrics(part, source, data) if evaluate else {
        "params": count_params(part.model), "flops": count_flops(part.model, part.manifest.input)}
    part.manifest.metrics = metrics
    _write(part.model, out, part.manifest)
    return Disassembled(part, source, search, check, metrics)


def pareto_front(candidates: list[dict]) -> list[dict]:
    """The candidates no other beats on both validation accuracy and FLOPs, by increasing FLOPs."""
    front = []
    for candidate in sorted(candidates, key=lambda c: (c["flops"], -c["accuracy"])):
        if not front or candidate["accuracy"] > front[-1]["accuracy"]:
            front.append(candidate)
    return front


def assemble(paths: Sequence[FilePath], out: FilePath, mode: str = "padded", scale_logits: bool = True,
             data: DataOptions | None = None, progress: bool = True, calibration: str | None = None,
             temperature: float = DEFAULT_TEMPERATURE) -> Brick:
    """Assemble component files into one model answering the union of their classes, calibrated by
    `calibration` (see `assembly`), and save it; a gate's statistics travel in the file."""
    if any(_graph_file(path) for path in paths):
        if calibration not in (None, "auto", "scale", "none"):
            raise ModellegoError(f"graph assemblies are calibrated by the paper's scaling only; drop --calibration "
                                 f"{calibration} (or pass --calibration scale or none)")
        return _graphs().assemble(paths, out, mode, scale_logits and calibration != "none", data)
    check_output_path(out, inputs=list(paths))
    if len(paths) < 2:
        raise ModellegoError(f"assembling needs at least two components, got {len(paths)}")
    if mode not in MODES:
        raise ModellegoError(f"unknown assembly mode {mode!r}; choose 'padded' or 'parallel'")
    if calibration is not None and calibration not in (*CALIBRATIONS, "auto"):
        raise ModellegoError(f"unknown calibration {calibration!r}; choose one of {', '.join(CALIBRATIONS)} or auto")
    result = assembly([load(path) for path in paths], mode, scale_logits, data, progress, calibration, temperature)
    _write(result.model, out, result.manifest)
    return result


def finetune(path: FilePath, out: FilePath, epochs: int = 2, lr: float = 1e-3, batch_size: int = 128,
             data: DataOptions | None = None, seed: int = 0, progress: bool = True, auto_batch: bool = False) -> Brick:
    """Train a model file (an assembly: its zero blocks too) on the training data of all its classes; save it.
    A batch size too large for the memory available is refused before training, or lowered with `auto_batch`."""
    if _graph_file(path):
        return _graphs().finetune(path, out, epochs, lr, data, seed)
    check_output_path(out, inputs=[path])
    model, manifest = load(path)
    train_data = (data or DataOptions()).of(manifest, "train")
    result = finetune_model(model, manifest, train_data, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                            progress=progress, auto_batch=auto_batch)
    _write(result.model, out, result.manifest)
    return result


def info(path: FilePath) -> Manifest:
    """A model file's manifest, without loading its weights."""
    return read_manifest(path)


# --- pictures: decision routes and heat maps (issue 12) ---------------------------------------------------------

FIGURE_FORMATS = (".png", ".svg")


def check_figure_path(out: FilePath, inputs: Sequence[FilePath] = ()) -> str:
    """Refuse (before any work) a figure path that does not end in .png or .svg or cannot be written; returns
    the format matplotlib writes ("png" or "svg")."""
    suffix = os.path.splitext(os.fspath(out))[1].lower()
    if suffix not in FIGURE_FORMATS:
        raise ModellegoError(f"--out {out} must end in .png or .svg (the figure's format), got "
                             f"{suffix or 'no suffix'}")
    check_output_path(out, inputs=list(inputs))
    return suffix[1:]


def save_figure(figure: Figure, out: FilePath) -> None:
    """Write a matplotlib figure to `out` (.png or .svg) atomically: a reader never sees half a picture."""
    kind = check_figure_path(out)
    atomic_write(out, lambda temp: figure.savefig(temp, format=kind, dpi=150))


def route(model_path: FilePath, profile_path: FilePath, classes: str | Sequence[str | int], out: FilePath,
          thresholds: Thresholds = PAPER, max_links: int = 40) -> viz.Routes:
    """Draw the decision routes of `classes` through a model file (masks located with its profile and
    `thresholds`) into `out` (.png or .svg); returns the routes, whose `table()` is the per-layer summary.
    `max_links` caps the lines drawn per class and pair of connected layers (the strongest stay)."""
    from modellego import viz

    check_figure_path(out, inputs=[model_path, profile_path])
    source = load(model_path)
    class_profile = Profile.load(profile_path)
    class_profile.check_model(source.model)
    masks = locate(source.model, class_profile, **thresholds.as_dict())
    routes = viz.decision_routes(source.model, class_profile, masks, classes, max_links)
    settings = ", ".join(f"{key} {value:g}" for key, value in thresholds.as_dict().items())
    title = (f"Decision routes of {', '.join(routes.classes)} in {os.path.basename(os.fspath(model_path))}\n"
             f"({source.manifest.architecture.get('builder', 'model')}, {settings}; "
             f"at most {max_links} strongest links per class and pair of layers)")
    save_figure(viz.route_figure(routes, title), out)
    return routes


@dataclass
class Heatmap:
    """`heatmap`'s result: the layer drawn and its classes × input channels values."""

    layer: str
    classes: list[str]
    values: torch.Tensor


def profile_layers(profile_path: FilePath) -> list[viz.LayerInfo]:
    """The layers of a profile file, in execution order (what `heatmap --layer` accepts)."""
    from modellego import viz

    return viz.profile_layers(Profile.load(profile_path))


def heatmap(profile_path: FilePath, out: FilePath, layer: str | None = None, model_path: FilePath | None = None,
            thresholds: Thresholds = PAPER) -> Heatmap:
    """Draw the soft relative contribution (classes × input channels) of one layer of a profile file — by
    default its last conv layer — into `out` (.png or .svg). With the profiled model (`model_path`), each
    class's row averages only over the layer's outputs that the class keeps (masks located with `thresholds`),
    which is what makes the rows differ; without it, over all outputs (the classifier: the class's own row)."""
    from modellego import viz

    check_figure_path(out, inputs=[profile_path, model_path])
    class_profile = Profile.load(profile_path)
    layer = layer if layer is not None else viz.default_layer(class_profile)
    if layer not in class_profile.contributions:
        viz.heatmap_values(class_profile, layer)  # refuses it, naming the profile's layers
    output_masks, weighting = None, "all outputs"
    if model_path is not None:
        source = load(model_path)
        class_profile.check_model(source.model)
        output_masks = locate(source.model, class_profile, **thresholds.as_dict()).masks[layer]
        weighting = "outputs each class keeps"
    values = viz.heatmap_values(class_profile, layer, output_masks)
    dataset = f" on {class_profile.dataset}" if class_profile.dataset else ""
    title = (f"{layer}: soft relative contribution per class and input channel\n(mean over {weighting}; "
             f"{os.path.basename(os.fspath(profile_path))}{dataset},\n"
             f"{class_profile.samples_per_class} samples per class)")
    save_figure(viz.heatmap_figure(values, class_profile.classes, layer, title), out)
    return Heatmap(layer, list(class_profile.classes), values)


# --- graph models (modellego.graphs, the optional extra `modellego[graph]`) ------------------------------------

def _graph_request(builder: str, dataset: str) -> bool:
    from modellego.graphs.spec import GRAPH_BUILDERS, GRAPH_DATASETS

    return builder in GRAPH_BUILDERS or dataset in GRAPH_DATASETS


def _graph_file(path: FilePath) -> bool:
    """Whether `path` holds a graph model; a missing or foreign file is left to the image path's errors."""
    from modellego.graphs.spec import is_graph_architecture

    try:
        return is_graph_architecture(read_manifest(path).architecture)
    except ModellegoError:
        return False


def _graphs():
    """The graph commands (importing them needs torch_geometric; without it, one error saying how to install)."""
    from modellego.graphs import require

    require()
    from modellego.graphs import pipeline as graph_pipeline

    return graph_pipeline
