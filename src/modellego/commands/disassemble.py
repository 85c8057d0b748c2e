"""`modellego disassemble`: a standalone component for some classes, cut out of a model file with its profile —
the paper's α/β or `--auto`'s, re-fitted without gradients unless `--no-reconstruct` — for any model kind."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from modellego.commands.common import (
    Device,
    FilePath,
    open_model,
    runs_models,
    runtime_options,
    source_baselines,
    threshold_options,
    write,
)
from modellego.core.evaluate import count_params
from modellego.core.hashing import weights_hash
from modellego.core.locate import DEFAULT_FLATTEN, PAPER, ComponentMasks, Feeds, FlattenRule, Thresholds
from modellego.core.profile import Profile
from modellego.core.reconstruct import RIDGE, Reconstruction
from modellego.core.samples import resolve_classes, task_labels
from modellego.core.search import GRID_STEP, SearchResult, check_auto_task, check_max_drop, search_grid
from modellego.data.task import DataOptions
from modellego.errors import ModellegoError
from modellego.io.atomic import check_output_path
from modellego.io.manifest import Brick, Manifest
from modellego.io.profiles import load_profile
from modellego.kinds import ModelKind, kind_of

AGREEMENT_GAP = 0.10  # a component this far below its restricted source on the profile's images gets a warning
MAX_RIDGE = 1e6
MIN_RIDGE = 1e-8  # below this the re-fit's normal equations are as good as unregularised: near-singular layers blow up


@dataclass
class ProfileSampleCheck:
    """A component and its source restricted to the task, on the task's profile samples (training data)."""

    component_accuracy: float
    restricted_base: float
    samples: int


@dataclass
class Disassembled:
    """`disassemble`'s result: the component written and its source, the α/β search when one ran (`search`,
    its provenance record in `auto`), the re-fit (`reconstruction`), the agreement check on the profile's
    samples, the metrics recorded, and what one sample is (`unit`: image, node)."""

    brick: Brick
    source: Brick
    search: SearchResult | None = None
    check: ProfileSampleCheck | None = None
    metrics: dict = field(default_factory=dict)
    reconstruction: Reconstruction | None = None
    auto: dict | None = None
    unit: str = "image"


def component(source: Brick, masks: ComponentMasks, classes: str | Sequence[str | int],
              reconstruct_samples: Any | None = None, ridge: float = RIDGE, graph: Feeds | None = None,
              flatten: FlattenRule | str = DEFAULT_FLATTEN) -> Brick:
    """The component of `source` for `classes` (its kind's cut), with a manifest recording its lineage: the
    source's hash and provenance, the task, α/β and the profile's hash. With `reconstruct_samples`, its layers are
    re-fitted to the source's outputs on them, recorded in the provenance too. `graph`: the channel graph `locate`
    used on `source.model`; `flatten`: the rule `locate` used, recorded."""
    return _component(source, masks, classes, reconstruct_samples, ridge, graph, flatten)[0]


def _component(source: Brick, masks: ComponentMasks, classes: str | Sequence[str | int],
               reconstruct_samples: Any | None = None, ridge: float = RIDGE, graph: Feeds | None = None,
               flatten: FlattenRule | str = DEFAULT_FLATTEN,
               built: tuple[nn.Module, Reconstruction | None] | None = None) -> tuple[Brick, Reconstruction | None]:
    """`component`, and the re-fit; `built`: the component and re-fit an α/β search made already (nothing is cut
    or re-fitted twice)."""
    kind = kind_of(source.manifest.architecture)
    names = [ref.name for ref in source.manifest.classes]
    if [names[k] for k in masks.output_positions(range(len(masks.classes)))] != masks.classes:
        raise ModellegoError("the masks were located for a model with other classes than this manifest describes")
    task = resolve_classes(masks.classes, classes, "the model's classes")
    positions = masks.output_positions(task)
    if built is None:  # without `graph`, the kind traces the copy it cuts (a traced graph is costly to copy)
        model, cut = kind.cut(source.model, masks, task, graph, source.manifest.input)
        refit = kind.reconstruct(model, source.model, cut, reconstruct_samples, ridge) \
            if reconstruct_samples is not None else None
    else:
        model, refit = built
    record: dict[str, Any] = {
        "source_hash": weights_hash(source.model), "source_provenance": source.manifest.provenance,
        "task": [source.manifest.classes[k].name for k in positions], "task_positions": positions,
        "profile_hash": masks.profile_hash, **masks.settings}
    if FlattenRule.parse(flatten) != DEFAULT_FLATTEN:  # the default is recorded by its absence
        record["flatten"] = FlattenRule.parse(flatten).value
    if refit is not None:
        record["reconstruction"] = refit.record()
    manifest = Manifest(architecture=kind.component_architecture(source.manifest, model, task),
                        classes=[source.manifest.classes[k] for k in positions], input=source.manifest.input,
                        kind="component", provenance={"disassembled": record})
    return Brick(model, manifest), refit


def profile_sample_accuracy(kind: ModelKind, component_model: nn.Module, source: nn.Module, task: list[int],
                            train: Any, profile: Profile, batch_size: int = 256) -> ProfileSampleCheck:
    """Accuracy of a component (outputs = the task, in order) and of `source` restricted to `task` (rows of the
    profile) on the profile's samples of the task; `train` is the training data the profile was computed on
    (positions = `profile.samples`). Cheap: at most the profile's N per class."""
    labels = task_labels(profile.sample_labels, task, len(profile.classes))
    chosen = labels >= 0
    if not chosen.any():
        return ProfileSampleCheck(float("nan"), float("nan"), 0)
    subset = kind.subset(train, profile.samples[chosen], labels[chosen])
    source_logits, labels = kind.predict(source, subset, batch_size)
    component_logits, _ = kind.predict(component_model, subset, batch_size)
    outputs = torch.tensor([profile.output_positions[row] for row in task])
    restricted = (source_logits[:, outputs].argmax(1) == labels).float().mean().item()
    own = (component_logits.argmax(1) == labels).float().mean().item()
    return ProfileSampleCheck(own, restricted, len(labels))


def component_metrics(part: Brick, source: Brick, data: DataOptions | None = None, batch_size: int = 256) -> dict:
    """Test metrics recorded in a component's manifest: its accuracy and its source's Base / Restricted base on
    the task (per class too), so that assemblies can report the mean Base of their sources later."""
    kind = kind_of(part.manifest.architecture)
    test = kind.data(part.manifest, "test", data)
    baselines = source_baselines(kind, source, part.manifest.classes, test, batch_size)
    logits, labels = kind.predict(part.model, test, batch_size)
    return {**baselines, "test_accuracy": (logits.argmax(1) == labels).float().mean().item(),
            "params": count_params(part.model), "flops": kind.count_flops(part.model, part.manifest.input)}


def pareto_front(candidates: list[dict]) -> list[dict]:
    """The candidates no other beats on both validation accuracy and FLOPs, by increasing FLOPs."""
    front = []
    for candidate in sorted(candidates, key=lambda c: (c["flops"], -c["accuracy"])):
        if not front or candidate["accuracy"] > front[-1]["accuracy"]:
            front.append(candidate)
    return front


def check_options(auto: bool, max_drop: float, grid_step: float, reconstruct: bool,
                  reconstruct_samples: int | None, ridge: float) -> None:
    """Refuse, before any work, numbers out of range and options outside the mode they belong to."""
    check_max_drop(max_drop)
    search_grid(grid_step)
    if not auto and grid_step != GRID_STEP:
        raise ModellegoError("--grid-step only applies with --auto; add --auto or drop it")
    if not auto and max_drop != 1.0:
        raise ModellegoError("--max-drop only applies with --auto; add --auto or drop it")
    if reconstruct_samples is not None:
        if not reconstruct:
            raise ModellegoError("--reconstruct-samples has no effect with --no-reconstruct; drop one of them")
        if reconstruct_samples < 1:
            raise ModellegoError(f"--reconstruct-samples must be at least 1, got {reconstruct_samples}")
    if not reconstruct and ridge != RIDGE:
        raise ModellegoError("--ridge has no effect with --no-reconstruct; drop one of them")
    if not MIN_RIDGE <= ridge <= MAX_RIDGE:
        raise ModellegoError(f"--ridge must be between {MIN_RIDGE:g} and {MAX_RIDGE:g}, got {ridge}")


@runs_models
def disassemble(model_path: FilePath, profile_path: FilePath, classes: str | Sequence[str | int], out: FilePath,
                thresholds: Thresholds = PAPER, auto: bool = False, max_drop: float = 1.0, evaluate: bool = False,
                data: DataOptions | None = None, seed: int = 0, progress: bool = True, reconstruct: bool = True,
                reconstruct_samples: int | None = None, flatten: FlattenRule | str = DEFAULT_FLATTEN,
                ridge: float = RIDGE, grid_step: float = GRID_STEP, device: Device = "auto", precision: str | None = None,
                workers: int | None = None) -> Disassembled:
    """Cut the component for `classes` out of a model file with its profile and save it: the paper's α/β (or
    `thresholds`), or with `auto` the smallest component within `max_drop` points of the restricted base on
    held-out training samples (graphs: the validation nodes). With `reconstruct` (the default), the component's
    layers are re-fitted without gradients to the source's outputs on the profile's samples of the task (or
    `reconstruct_samples` training samples per class); `reconstruct=False` is the paper's pure method. `flatten`
    chooses the rule at a flatten (see `locate`); `grid_step`, the spacing of `auto`'s α/β grid. Warns when the
    component is far below its source on the profile's samples. With `evaluate`, the test-split metrics (Base,
    Restricted base, accuracy) are measured and recorded. An option the model's kind cannot honour is refused.
    The work runs on `device`; `precision` applies to scoring (`auto`'s candidates, evaluation), never to the
    re-fit or the weights written; `workers` to data loading."""
    flatten = FlattenRule.parse(flatten)
    check_options(auto, max_drop, grid_step, reconstruct, reconstruct_samples, ridge)
    check_output_path(out, inputs=[model_path, profile_path])
    source, kind = open_model(model_path, device)
    kind.check_options({"--auto": auto, "--flatten": flatten != DEFAULT_FLATTEN, **threshold_options(thresholds),
                        "--image-size": data is not None and data.image_size is not None,
                        "--no-verify": data is not None and not data.verify, **runtime_options(precision, workers)})
    positions = resolve_classes(source.manifest.class_names, classes, "the model's classes")
    if auto:
        check_auto_task(positions)
    names = [source.manifest.class_names[k] for k in positions]
    profile = load_profile(profile_path, positions, names)  # only the task's records are read
    kind.check_profile(source.model, profile, source.manifest.input)
    task = list(range(len(positions)))  # the profile's rows: the task's classes, in the task's order
    train = kind.data(source.manifest, "train", data)
    kind.check_profile_samples(profile, train)
    samples = (kind.reconstruction_samples(train, profile, task, reconstruct_samples, seed, source.model)
               if reconstruct else None)
    graph = kind.channels(source.model, source.manifest.input)  # traced once: search, locate, cut
    search, built, auto_record = None, None, None
    if auto:
        search = kind.search(source.model, profile, task, kind.validation(train, positions, profile, seed), max_drop,
                             kind.auto_grid(grid_step), samples, ridge, flatten, graph, progress)
        thresholds, masks = search.thresholds, search.masks
        built = (search.component, search.reconstruction)
        auto_record = {"max_drop": max_drop, "validation_samples": search.validation_samples,
                       "validation_accuracy": search.accuracy, "validation_restricted_base": search.restricted_base,
                       "met_target": search.met_target, "pareto": pareto_front(search.candidates),
                       "evaluated": len(search.candidates), "grid": search.grid}
        if grid_step != GRID_STEP:  # the default is recorded by its absence, so earlier files stay byte-equal
            auto_record["grid_step"] = grid_step
    else:
        masks = kind.locate(source.model, profile, thresholds, graph, flatten)
    part, refit = _component(source, masks, task, samples, ridge, graph, flatten, built)
    if auto_record is not None:
        part.manifest.provenance["disassembled"]["auto"] = auto_record
    check = None
    if profile.dataset == train.name:  # positions index this data only when it was profiled on it
        check = profile_sample_accuracy(kind, part.model, source.model, task, train, profile)
        if check.component_accuracy < check.restricted_base - AGREEMENT_GAP:
            warnings.warn(f"the component gets {100 * check.component_accuracy:.2f}% of the task's {check.samples} "
                          f"profile {kind.unit}s right, {100 * (check.restricted_base - check.component_accuracy):.1f}"
                          f" points below its source restricted to the task ({100 * check.restricted_base:.2f}%): "
                          "these α/β cut channels the task needs; try --auto", stacklevel=2)
    metrics = component_metrics(part, source, data) if evaluate else {
        "params": count_params(part.model), "flops": kind.count_flops(part.model, part.manifest.input)}
    part.manifest.metrics = metrics
    write(part.model, out, part.manifest)
    return Disassembled(part, source, search, check, metrics, refit, auto_record, kind.unit)
