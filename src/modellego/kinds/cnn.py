"""Convolutional classifiers on images: the zoo's and torchvision's (any nn.Module whose logits come from an
nn.Linear), with the dataset's normalisation as the first module. The kind every command started with: its
verbs are the core's functions on images."""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from modellego import distributed
from modellego.core import gates
from modellego.core.assemble import AssemblyMode, assemble, scale
from modellego.core.channels import ChannelGraph
from modellego.core.cut import Cut, disassemble_with_cut
from modellego.core.evaluate import count_flops, count_params, evaluate, predict
from modellego.core.gates import Calibrated, Calibration, Gate
from modellego.core.joint import JOINT, Joint, JointHead
from modellego.core.joint import fit as fit_joint
from modellego.core.layers import channel_pairs
from modellego.core.locate import ComponentMasks, FlattenRule, Thresholds, locate
from modellego.core.modules import MergeOutputs, Parallel
from modellego.core.profile import ClassRecord, Profile, ProfilePlan, class_records, plan_profile, profile
from modellego.core.reconstruct import (
    IN_MEMORY,
    RECONSTRUCT_MAX_PER_CLASS,
    Reconstruction,
    images_to_determine,
    reconstruct_component,
)
from modellego.core.samples import SampleSubset
from modellego.core.search import Candidates, ImageCandidates, SearchResult, restricted_base, search, validation_data
from modellego.core.support import check_supported
from modellego.data import datasets
from modellego.data.spec import InputSpec
from modellego.data.subsets import per_class_slice, select_classes
from modellego.data.task import DataOptions, task_data
from modellego.io.fields import Invalid, integer, mapping, number, sequence, show, string
from modellego.io.manifest import (
    MAX_CHANNELS,
    MAX_CLASSES,
    MAX_MEMBERS,
    MAX_NAME,
    MAX_PARALLEL_NESTING,
    MAX_SIDE,
    MAX_WIDTH,
    Brick,
    ClassRef,
    Manifest,
)
from modellego.io.safetensors import MAX_TENSORS
from modellego.kinds.base import ExportInputs, ModelKind, Trained, TrainOptions
from modellego.memory import plan_training, sample_shape_of
from modellego.models import warn_if_oversized
from modellego.models.classifier import classifier
from modellego.train import processes, seed_everything, settle, train

PARALLEL = "parallel"
MAX_JOINT_WEIGHTS = 1 << 28  # a joint head's weights in a file (1 GiB in float32; 8192 features × 32,768 classes)


def shape_of(spec: InputSpec) -> tuple[int, ...]:
    """One image's shape (C, H, W)."""
    return (spec.channels, *spec.size)


class CNN(ModelKind):
    name = "cnn"
    unit = "image"

    # --- manifests -------------------------------------------------------------------------------------------------

    def owns(self, architecture: Any) -> bool:
        return True  # the kind of every file that no other kind claims (files written before kinds existed)

    def handles(self, builder: str, dataset: str) -> bool:
        return True

    def check_input(self, value: Any, field: str) -> InputSpec:
        data = mapping(value, field)
        channels = integer(data.get("channels"), f"{field}.channels", 1, MAX_CHANNELS)
        size = sequence(data.get("size"), f"{field}.size", 2, 2)
        side = [integer(v, f"{field}.size[{i}]", 1, MAX_SIDE) for i, v in enumerate(size)]
        stats = {}
        for name, low in (("mean", -1e6), ("std", 1e-6)):  # a smaller deviation would divide images into infinities
            values = sequence(data.get(name), f"{field}.{name}", 1, channels * MAX_MEMBERS)
            if len(values) % channels:
                raise Invalid(f"{field}.{name} has {len(values)} values; it needs one per input channel "
                              f"({channels}), or a multiple for stacked normalisations")
            stats[name] = tuple(number(v, f"{field}.{name}[{i}]", low, 1e6)
                                for i, v in enumerate(values))
        if len(stats["mean"]) != len(stats["std"]):
            raise Invalid(f"{field}.mean and {field}.std have different lengths")
        return InputSpec(channels, (side[0], side[1]), stats["mean"], stats["std"])

    def check_architecture(self, value: Any, field: str, spec: Any) -> dict[str, Any]:
        return self._architecture(value, field, [0])

    def _architecture(self, value: Any, field: str, members_seen: list[int], level: int = 0) -> dict[str, Any]:
        """Check an architecture record; `members_seen` counts parallel members over the whole tree."""
        data = mapping(value, field)
        builder = string(data.get("builder"), f"{field}.builder", MAX_NAME)
        if builder == PARALLEL:
            if level >= MAX_PARALLEL_NESTING:
                raise Invalid(f"{field} nests parallel assemblies more than {MAX_PARALLEL_NESTING} deep")
            members = sequence(data.get("members"), f"{field}.members", 1, MAX_MEMBERS)
            members_seen[0] += len(members)
            if members_seen[0] > MAX_MEMBERS:
                raise Invalid(f"{field} has more than {MAX_MEMBERS} parallel members in all")
            for i, member in enumerate(members):
                self.check_input(mapping(member, f"{field}.members[{i}]").get("input"), f"{field}.members[{i}].input")
                self._architecture(member, f"{field}.members[{i}]", members_seen, level + 1)
        else:
            integer(data.get("num_classes", 1), f"{field}.num_classes", 1, MAX_CLASSES)
            number(data.get("width", 1.0), f"{field}.width", 0.0, MAX_WIDTH, low_open=True)
            if "in_channels" in data:
                integer(data["in_channels"], f"{field}.in_channels", 1, MAX_CHANNELS)
            if not isinstance(data.get("merge_outputs", False), bool):
                raise Invalid(f"{field}.merge_outputs must be true or false, got {show(data['merge_outputs'])}")
        if "gate" in data:
            if level > 0:
                raise Invalid(f"{field}.gate: only the outermost assembly may carry a gate")
            _check_gate(data["gate"], f"{field}.gate", data)
        if "joint" in data:
            if level > 0 or "gate" in data:
                raise Invalid(f"{field}.joint: only the outermost assembly may carry a joint head, and not with a gate")
            _check_joint(data["joint"], f"{field}.joint", data)
        return data

    def build(self, architecture: dict[str, Any], spec: Any) -> nn.Module:
        if "gate" in architecture:  # a calibrated assembly: the assembly itself, and the gate between logits and merge
            inner = self.build({key: value for key, value in architecture.items() if key != "gate"}, spec)
            return Calibrated(inner, Gate(architecture["gate"]))
        if "joint" in architecture:  # an assembly answered by its joint head
            inner = self.build({key: value for key, value in architecture.items() if key != "joint"}, spec)
            return Joint(inner, JointHead(architecture["joint"]))
        builder = architecture.get("builder")
        if builder == PARALLEL:
            members = [self.build(member, InputSpec.from_dict(member["input"])) for member in architecture["members"]]
            return Parallel(members, [0])
        model = classifier(builder, spec, int(architecture.get("num_classes", 1)),
                           float(architecture.get("width", 1.0)))
        if architecture.get("merge_outputs"):
            model.add_module("merge", MergeOutputs([0]))
        return model

    def structure_error(self, model: nn.Module, manifest: Manifest) -> str | None:
        for name, module in model.named_modules():
            if isinstance(module, nn.Conv2d) and module.out_channels % module.groups:
                return f"{name} has {module.out_channels} output channels, not a multiple of its {module.groups} groups"
            # checked here: the meta device's convolution does not check its bias
            if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None and \
                    tuple(module.bias.shape) != (module.weight.shape[0],):
                return (f"{name}.bias has shape {list(module.bias.shape)} but {name}.weight has "
                        f"{module.weight.shape[0]} outputs")
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                sizes = {key: tuple(value.shape) for key, value in (("weight", module.weight), ("bias", module.bias),
                         ("running_mean", module.running_mean), ("running_var", module.running_var))
                         if value is not None}
                if len(set(sizes.values())) > 1 or any(len(size) != 1 for size in sizes.values()):
                    return f"{name}'s parameters and statistics differ in shape ({sizes})"
        merges = [module for module in model.modules() if isinstance(module, MergeOutputs)]

        def merged(module: MergeOutputs, logits: torch.Tensor) -> torch.Tensor:
            if logits.dim() != 2 or logits.shape[1] != module.targets.shape[0]:
                raise ValueError(f"merge.targets has {module.targets.shape[0]} entries for {list(logits.shape)} logits")
            return logits.new_empty(logits.shape[0], len(manifest.classes))

        for module in merges:  # the class count is data (targets' values), unknown on meta: checked after loading
            module.forward = lambda logits, module=module: merged(module, logits)
        try:
            output = model.eval()(torch.empty(1, *shape_of(manifest.input), device="meta"))
        except NotImplementedError:
            return None  # an operation without a meta kernel: the shapes were checked one by one already
        except Exception as error:  # shape mismatches surface as RuntimeError/ValueError/IndexError from torch
            text = str(error).splitlines()[0] if str(error) else type(error).__name__
            return text[:200]
        finally:
            for module in merges:
                del module.forward
        if not isinstance(output, torch.Tensor) or tuple(output.shape) != (1, len(manifest.classes)):
            shape = list(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            return f"it outputs {shape} for one image but the manifest lists {len(manifest.classes)} classes"
        return None

    # --- data ------------------------------------------------------------------------------------------------------

    def data(self, manifest: Manifest, split: str, options: DataOptions | None = None, dataset: str | None = None,
             only: str | Sequence[str | int] | None = None) -> Dataset:
        options = options or DataOptions()
        return task_data(manifest, split, root=options.root, dataset=dataset, only=only,
                         image_size=options.image_size, verify=options.verify)

    def subset(self, samples: Dataset, positions: torch.Tensor, labels: torch.Tensor | None = None) -> SampleSubset:
        return SampleSubset(samples, positions, labels)

    def union(self, parts: Sequence[Dataset], labels: torch.Tensor) -> Dataset:
        images = torch.cat([torch.stack([part[i][0] for i in range(len(part))]) for part in parts])
        return TensorDataset(images, labels)

    def predict(self, model: nn.Module, samples: Dataset, batch_size: int = 256,
                progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        return predict(model, samples, batch_size, progress)

    def count_flops(self, model: nn.Module, spec: InputSpec) -> int:
        return count_flops(model, spec)

    def export_inputs(self, samples: Dataset, count: int) -> ExportInputs:
        """`count` images spread evenly over `samples` (a folder's images are sorted by class: every class comes
        in), pixels in [0, 1]; the batch dimension varies."""
        positions = torch.linspace(0, len(samples) - 1, min(count, len(samples))).long().unique()
        images = torch.stack([samples[int(position)][0] for position in positions])
        if len(images) == 1:  # torch.export takes a dimension of size 1 for a constant
            images = images.repeat(2, 1, 1, 1)
        return ExportInputs((images,), ("images",), ({0: "batch"},))

    # --- training --------------------------------------------------------------------------------------------------

    def train(self, builder: str, dataset: str, options: TrainOptions, data: DataOptions,
              progress: bool = True) -> Trained:
        train_data = datasets.load(dataset, "train", data.root, image_size=data.image_size, verify=data.verify)
        test_data = datasets.load(dataset, "test", data.root, image_size=data.image_size, verify=data.verify)
        if options.classes is not None:
            train_data = select_classes(train_data, options.classes)
            test_data = select_classes(test_data, options.classes)
        if options.max_per_class is not None:
            train_data = per_class_slice(train_data, options.max_per_class, options.seed)
        model, manifest = train_model(builder, train_data, options.epochs or self.default_epochs, width=options.width,
                                      lr=options.lr or self.default_lr, batch_size=options.batch_size or 128,
                                      seed=options.seed, progress=progress, auto_batch=options.auto_batch,
                                      device=options.device)
        result = evaluate(model, test_data, progress=progress)
        metrics = {"accuracy": result.accuracy, "per_class": result.per_class, "samples": result.samples,
                   "params": count_params(model), "flops": count_flops(model, manifest.input)}
        manifest.metrics = {"test_accuracy": metrics["accuracy"], "params": metrics["params"],
                            "flops": metrics["flops"]}
        return Trained(Brick(model, manifest), metrics, len(train_data))

    def finetune(self, brick: Brick, samples: Dataset, epochs: int, lr: float | None, batch_size: int | None,
                 seed: int, progress: bool = True, auto_batch: bool = False) -> Brick:
        return finetune(brick.model, brick.manifest, samples, epochs=epochs, lr=lr or self.default_lr,
                        batch_size=batch_size or 128, seed=seed, progress=progress, auto_batch=auto_batch)

    # --- the method ------------------------------------------------------------------------------------------------

    def profile(self, model: nn.Module, samples: Dataset, samples_per_class: int = 50, batch_size: int = 64,
                progress: bool = False, classes: Sequence[str | int] | None = None) -> Profile:
        return profile(model, samples, samples_per_class=samples_per_class, batch_size=batch_size, progress=progress,
                       classes=classes)

    def profile_stream(self, model: nn.Module, samples: Dataset, samples_per_class: int = 50, batch_size: int = 64,
                       progress: bool = False, classes: Sequence[str | int] | None = None
                       ) -> tuple[ProfilePlan, Iterator[ClassRecord]]:
        plan = plan_profile(model, samples, classes=classes, samples_per_class=samples_per_class,
                            batch_size=batch_size, progress=progress)
        for note in plan.selection.notes:
            warnings.warn(note, stacklevel=3)
        return plan, class_records(model, samples, plan, progress)

    def pairs(self, model: nn.Module) -> int:
        return channel_pairs(model)

    def check_profile(self, model: nn.Module, profile: Profile, spec: InputSpec | None = None) -> None:
        profile.check_model(model, shape_of(spec) if spec is not None else None)

    def channels(self, model: nn.Module, spec: InputSpec) -> ChannelGraph:
        return ChannelGraph(model, shape_of(spec))

    def locate(self, model: nn.Module, profile: Profile, thresholds: Thresholds, graph: ChannelGraph,
               flatten: FlattenRule) -> ComponentMasks:
        return locate(model, profile, thresholds, graph=graph, flatten=flatten)

    def cut(self, model: nn.Module, masks: ComponentMasks, task: list[int], graph: ChannelGraph | None,
            spec: InputSpec) -> tuple[nn.Module, Cut]:
        return disassemble_with_cut(model, masks, task, shape_of(spec), graph)

    def component_architecture(self, source: Manifest, component: nn.Module, task: list[int]) -> dict[str, Any]:
        return dict(source.architecture, num_classes=len(task))

    def default_reconstruction_per_class(self, model: nn.Module, profile: Profile, task: list[int]) -> int | None:
        """Enough images to determine every re-fitted layer (`images_to_determine`: ROWS_PER_UNKNOWN rows per
        unknown), spread over the task's classes, at most RECONSTRUCT_MAX_PER_CLASS per class and at most what
        fits in memory as one tensor; the profile's own samples when they are enough."""
        shape = tuple(profile.input_shape)
        if not shape:  # a profile that does not record its input shape (format 1): its own images, as before
            return None
        needed = images_to_determine(model, shape)
        fitting = IN_MEMORY // math.prod(shape)  # beyond this, every layer's pass would decode the images again
        per_class = min(math.ceil(needed / len(task)), RECONSTRUCT_MAX_PER_CLASS, max(1, fitting // len(task)))
        return per_class if per_class > profile.samples_per_class else None

    def reconstruct(self, component: nn.Module, source: nn.Module, cut: Cut, samples: Dataset,
                    ridge: float) -> Reconstruction:
        return reconstruct_component(component, source, cut, samples, ridge)

    def validation(self, train: Dataset, positions: list[int], profile: Profile, seed: int = 0) -> SampleSubset:
        return validation_data(train, positions, profile.samples, 0.1, seed)

    def search(self, model: nn.Module, profile: Profile, task: list[int], validation: Dataset, max_drop: float,
               grid: Sequence[Thresholds], samples: Dataset | None, ridge: float, flatten: FlattenRule,
               graph: ChannelGraph, progress: bool = False) -> SearchResult:
        logits, labels = predict(model.eval(), validation)
        labels, restricted = restricted_base(logits, labels, [profile.output_positions[k] for k in task],
                                             profile.outputs)
        candidates = self.candidates(model, profile, task, validation, samples, ridge, flatten, graph)
        return search(candidates, grid, labels, restricted, max_drop, progress)

    def candidates(self, model: nn.Module, profile: Profile, task: list[int], validation: Dataset,
                   samples: Dataset | None, ridge: float, flatten: FlattenRule, graph: ChannelGraph) -> Candidates:
        """What the α/β search walks for this kind (core.search.Candidates)."""
        return ImageCandidates(model, profile, task, validation, graph, flatten, samples, ridge)

    def scale(self, model: nn.Module, samples: Dataset, spec: InputSpec,
              progress: bool = False) -> tuple[nn.Module, list[float]]:
        return scale(model, samples, shape_of(spec), progress)

    def fit_gate(self, calibration: Calibration, model: nn.Module, samples: Dataset,
                 spec: InputSpec) -> dict[str, torch.Tensor]:
        return gates.fit(calibration, model, samples, shape_of(spec))

    def fit_joint(self, models: Sequence[nn.Module], samples: Sequence[Dataset], targets: Sequence[int],
                  spec: InputSpec) -> dict[str, Any]:
        return fit_joint(models, samples, targets, shape_of(spec))

    def assemble(self, models: Sequence[nn.Module], spec: InputSpec, mode: AssemblyMode, targets: Sequence[int],
                 calibration: Calibration, stats: Sequence[dict[str, torch.Tensor]] | dict | None,
                 temperature: float) -> nn.Module:
        fitted = calibration.is_gate or calibration == Calibration.JOINT
        return assemble(models, shape_of(spec), mode, targets, calibration=calibration if fitted else None,
                        stats=stats, temperature=temperature)

    def assembly_architecture(self, members: Sequence[Brick], mode: AssemblyMode, model: nn.Module,
                              num_classes: int) -> dict[str, Any]:
        if mode == AssemblyMode.PARALLEL:
            architecture = {"builder": PARALLEL, "num_classes": num_classes,
                            "members": [dict(m.architecture, input=m.input.to_dict()) for _, m in members]}
        else:
            architecture = dict(members[0].manifest.architecture, num_classes=num_classes, merge_outputs=True)
        if isinstance(model, Calibrated):
            architecture["gate"] = model.gate.config
        if isinstance(model, Joint):
            architecture["joint"] = model.head.config
        return architecture


def _check_gate(value: Any, field: str, architecture: dict[str, Any]) -> None:
    """Check a calibrated assembly's gate record: a known method, a positive temperature, and per component an
    output range and the layers it reads (names only; that they exist is checked by the meta forward pass)."""
    data = mapping(value, field)
    if data.get("method") not in gates.GATES:
        raise Invalid(f"{field}.method must be one of {', '.join(gates.GATES)}, got {show(data.get('method'))}")
    number(data.get("temperature", 1.0), f"{field}.temperature", 0.0, 1e6, low_open=True)
    integer(data.get("neighbours", 1), f"{field}.neighbours", 1, MAX_TENSORS)
    components = sequence(data.get("components"), f"{field}.components", 2, MAX_MEMBERS)
    if not architecture.get("merge_outputs") and architecture.get("builder") != PARALLEL:
        raise Invalid(f"{field}: a gate needs an assembly (merged outputs) to sit in")
    for c, component in enumerate(components):
        where = f"{field}.components[{c}]"
        record = mapping(component, where)
        start = integer(record.get("start"), f"{where}.start", 0, MAX_CLASSES)
        integer(record.get("stop"), f"{where}.stop", start + 1, MAX_CLASSES)
        for t, tap in enumerate([record.get("features"), *sequence(record.get("pattern", []), f"{where}.pattern", 0, 64)]):
            tap = mapping(tap, f"{where}.taps[{t}]")
            string(tap.get("layer"), f"{where}.taps[{t}].layer", MAX_NAME)
            for part in ("rows", "columns"):
                if not isinstance(tap.get(part, False), bool):
                    raise Invalid(f"{where}.taps[{t}].{part} must be true or false")


def _check_joint(value: Any, field: str, architecture: dict[str, Any]) -> None:
    """Check a joint head's record: its width and class count in bounds, and per component the layers it is
    read at (names only; that they exist and give `features` numbers is checked by the meta forward pass)."""
    data = mapping(value, field)
    if data.get("method") != JOINT:
        raise Invalid(f"{field}.method must be {JOINT!r}, got {show(data.get('method'))}")
    features = integer(data.get("features"), f"{field}.features", 1, MAX_JOINT_WEIGHTS)
    classes = integer(data.get("classes"), f"{field}.classes", 1, MAX_CLASSES)
    if features * classes > MAX_JOINT_WEIGHTS:
        raise Invalid(f"{field}: a {classes} × {features} head is beyond {MAX_JOINT_WEIGHTS:,} weights")
    if not architecture.get("merge_outputs") and architecture.get("builder") != PARALLEL:
        raise Invalid(f"{field}: a joint head needs an assembly (merged outputs) to sit in")
    components = sequence(data.get("components"), f"{field}.components", 2, MAX_MEMBERS)
    for c, component in enumerate(components):
        for t, tap in enumerate(sequence(component, f"{field}.components[{c}]", 1, 64)):
            tap = mapping(tap, f"{field}.components[{c}][{t}]")
            string(tap.get("layer"), f"{field}.components[{c}][{t}].layer", MAX_NAME)
            if not isinstance(tap.get("columns", False), bool):
                raise Invalid(f"{field}.components[{c}][{t}].columns must be true or false")


# --- the library's training functions on images ------------------------------------------------------------------

def train_model(builder: str, dataset: Dataset, epochs: int, width: float = 1.0, lr: float = 1e-3,
                batch_size: int = 128, seed: int = 0, progress: bool = True, auto_batch: bool = False,
                device: str | torch.device = "cpu") -> Brick:
    """Build `builder` for `dataset`'s input spec and classes, train it, re-estimate its BatchNorm statistics
    and describe it in a manifest (warning when it stayed at chance level on its training data). Before the
    first step, the peak memory at `batch_size` is estimated: too much is refused, or with `auto_batch` the
    largest batch size that fits is used; the estimate goes into the provenance. The weights are drawn on the
    CPU, so a seed gives the same start on every `device`."""
    seed_everything(seed)
    warn_if_oversized(builder, dataset.spec.size)
    model = classifier(builder, dataset.spec, len(dataset.classes), width).to(device)
    # Memory first: the estimate runs on the meta device, while the support check runs the model for real.
    memory = plan_training(model, (dataset.spec.channels, *dataset.spec.size), batch_size, auto_batch, builder,
                           samples=len(dataset))
    check_supported(model, (dataset.spec.channels, *dataset.spec.size), builder)
    batch_size = distributed.smallest(memory.batch_size if memory is not None else batch_size)
    losses = train(model, dataset, epochs, lr=lr, batch_size=batch_size, seed=seed, progress=progress)
    settled = settle(model, dataset, seed, progress)
    root = getattr(dataset, "root", None)
    manifest = Manifest(
        architecture={"builder": builder, "in_channels": dataset.spec.channels,
                      "num_classes": len(dataset.classes), "width": width},
        classes=[ClassRef(name, dataset.name, index) for name, index in zip(dataset.classes, dataset.class_indices)],
        input=dataset.spec,
        provenance={"trained": {"dataset": dataset.name, "samples": len(dataset), "epochs": epochs, "lr": lr,
                                "batch_size": batch_size, "seed": seed, "final_loss": losses[-1],
                                "data_root": str(root) if root is not None else None, **settled,
                                **({"memory": memory.record()} if memory is not None else {}),
                                **processes()}},
    )
    return Brick(model, manifest)


def finetune(model: nn.Module, manifest: "Manifest", dataset: Dataset | None = None, epochs: int = 2,
             lr: float = 1e-3, batch_size: int = 128, seed: int = 0, root=None, image_size: int | None = None,
             verify: bool = True, progress: bool = True, auto_batch: bool = False) -> Brick:
    """Train `model` (typically an assembly, whose zero blocks become trainable) on the training data of
    all its classes (or `dataset`, labelled by its outputs), then re-estimate its BatchNorm statistics;
    the manifest keeps its lineage. Memory is planned as in `train_model` (refused, or `auto_batch`)."""
    data = dataset if dataset is not None else task_data(manifest, "train", root=root, image_size=image_size,
                                                         verify=verify)
    shape = sample_shape_of(data)
    memory = (plan_training(model, shape, batch_size, auto_batch, "the model", samples=len(data))
              if shape is not None else None)
    batch_size = distributed.smallest(memory.batch_size if memory is not None else batch_size)
    losses = train(model, data, epochs, lr=lr, batch_size=batch_size, seed=seed, progress=progress)
    settled = settle(model, data, seed, progress)
    manifest = copy.deepcopy(manifest)
    history = manifest.provenance.setdefault("finetuned", [])
    history.append({"epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed,
                    "samples": len(data), "final_loss": losses[-1], **settled,
                    **({"memory": memory.record()} if memory is not None else {}), **processes()})
    manifest.metrics = {}
    return Brick(model, manifest)
