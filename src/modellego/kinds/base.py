"""The one contract every model kind fulfils (`ModelKind`): what differs between CNNs, GCNs and, next,
Transformers — which layers carry parameters, how logits come out of data, how channels feed each other, how a
component is cut and re-fitted, how components run side by side, how a manifest records and rebuilds the model —
behind one set of verbs, so that the method (profile → locate → cut → re-fit → assemble → calibrate) and the
commands are written once. Like torch-pruning's handler table or captum's attribution base class: a new kind is
a new subclass registered in `modellego.kinds`, never a new copy of the pipeline.

A kind also says which options it honours: an option it cannot honour is refused in one line (`check_options`),
never silently dropped."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from modellego.core.assemble import AssemblyMode
from modellego.core.cut import Cut
from modellego.core.gates import Calibration
from modellego.core.locate import ComponentMasks, Feeds, FlattenRule, Thresholds
from modellego.core.profile import ClassRecord, Profile, ProfilePlan, as_records
from modellego.core.reconstruct import Reconstruction
from modellego.core.search import SearchResult, grid_of, search_grid
from modellego.data.task import DataOptions
from modellego.errors import ModellegoError
from modellego.io.manifest import Brick, Manifest


@dataclass
class Trained:
    """A trained model before it is written: the model and manifest, its test metrics (accuracy, per class,
    params, FLOPs) and the number of training samples it saw (`unit`: what a sample is)."""

    brick: Brick
    metrics: dict
    samples: int
    unit: str = "image"


@dataclass(frozen=True)
class ExportInputs:
    """One batch as an exported graph takes it: the tensors of the model's forward pass, their names in the graph
    and, per tensor, the dimensions whose size may change (dimension → its name: the batch, a graph's nodes)."""

    tensors: tuple[torch.Tensor, ...]
    names: tuple[str, ...]
    dynamic: tuple[dict[int, str], ...]


@dataclass
class TrainOptions:
    """What `train` was asked for; None means the kind's default (and, for an option the kind does not honour,
    that it was not given)."""

    epochs: int | None = None
    classes: str | None = None
    width: float = 1.0
    lr: float | None = None
    batch_size: int | None = None
    max_per_class: int | None = None
    seed: int = 0
    auto_batch: bool = False
    device: str | torch.device = "cpu"  # where the model is trained (a device resolved by the command)


class ModelKind(ABC):
    """A kind of model the method applies to. Samples are whatever the kind's data is made of (images of a
    dataset, nodes of a graph): a sized collection with `.targets` (output positions), `.classes` and `.name`,
    which only the kind itself reads."""

    name: str                              # "cnn", "gcn"
    unit: str                              # what one sample is: "image", "node"
    default_mode: AssemblyMode = AssemblyMode.PARALLEL
    modes: tuple[AssemblyMode, ...] = (AssemblyMode.PADDED, AssemblyMode.PARALLEL)
    calibrations: tuple[Calibration, ...] = tuple(item for item in Calibration if item != Calibration.AUTO)
    default_epochs: int = 3
    default_lr: float = 1e-3
    unsupported: dict[str, str] = {}       # option (as the command line spells it) → why it does not apply

    def check_options(self, given: dict[str, bool]) -> None:
        """Refuse, in one line, the first option the user gave (`given[option]` is True) that this kind does not
        honour."""
        for option, used in given.items():
            if used and option in self.unsupported:
                raise ModellegoError(f"{option} does not apply to {self.name.upper()} models "
                                     f"({self.unsupported[option]}); drop it")

    def check_mode(self, mode: AssemblyMode) -> None:
        if mode not in self.modes:
            raise ModellegoError(f"{self.name.upper()} components assemble in --mode "
                                 f"{' or '.join(m.value for m in self.modes)}, not {mode.value!r}")

    def check_calibration(self, calibration: Calibration) -> None:
        if calibration != Calibration.AUTO and calibration not in self.calibrations:
            raise ModellegoError(f"{self.name.upper()} assemblies are calibrated by "
                                 f"{', '.join(c.value for c in self.calibrations)} or auto, not "
                                 f"{calibration.value!r}; pass one of those")

    # --- manifests: what a file records and how the model is rebuilt -------------------------------------------

    @abstractmethod
    def owns(self, architecture: Any) -> bool:
        """Whether a manifest's architecture record is this kind's."""

    @abstractmethod
    def handles(self, builder: str, dataset: str) -> bool:
        """Whether `train --model builder --data dataset` trains a model of this kind."""

    @abstractmethod
    def check_input(self, value: Any, field: str) -> Any:
        """A manifest's input record, checked (raises io.fields.Invalid), as this kind's input spec."""

    @abstractmethod
    def check_architecture(self, value: Any, field: str, spec: Any) -> dict[str, Any]:
        """A manifest's architecture record, checked (raises io.fields.Invalid)."""

    @abstractmethod
    def build(self, architecture: dict[str, Any], spec: Any) -> nn.Module:
        """The (randomly initialised) model an architecture record describes, before it is resized to the
        shapes a file holds."""

    @abstractmethod
    def structure_error(self, model: nn.Module, manifest: Manifest) -> str | None:
        """Why a model built on the meta device and resized to a file's shapes does not fit together or does not
        answer the manifest's classes, or None; nothing may be allocated."""

    # --- data ----------------------------------------------------------------------------------------------------

    @abstractmethod
    def data(self, manifest: Manifest, split: str, options: DataOptions | None = None, dataset: str | None = None,
             only: str | Sequence[str | int] | None = None) -> Any:
        """The `split` samples of a model's classes, labelled by output position; `dataset` reads another
        dataset whose class names match, `only` keeps some of the model's classes (labels unchanged)."""

    @abstractmethod
    def subset(self, samples: Any, positions: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        """The samples at `positions` (positions as a profile records them), relabelled by `labels` if given."""

    @abstractmethod
    def union(self, parts: Sequence[Any], labels: torch.Tensor) -> Any:
        """The samples of several parts (of one kind's data) in order, labelled by `labels`."""

    @abstractmethod
    def predict(self, model: nn.Module, samples: Any, batch_size: int = 256,
                progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """All logits of `model` on `samples` (float, on the CPU) and their labels, in order."""

    @abstractmethod
    def count_flops(self, model: nn.Module, spec: Any) -> int:
        """FLOPs of one sample's forward pass."""

    # --- training --------------------------------------------------------------------------------------------------

    @abstractmethod
    def train(self, builder: str, dataset: str, options: TrainOptions, data: DataOptions,
              progress: bool = True) -> Trained:
        """Build and train `builder` on `dataset` and evaluate it on the test split (not written)."""

    @abstractmethod
    def finetune(self, brick: Brick, samples: Any, epochs: int, lr: float | None, batch_size: int | None,
                 seed: int, progress: bool = True, auto_batch: bool = False) -> Brick:
        """Train a model (an assembly: all of it) on `samples` of all its classes; the manifest keeps its
        lineage and records the run."""

    # --- the method ------------------------------------------------------------------------------------------------

    @abstractmethod
    def profile(self, model: nn.Module, samples: Any, samples_per_class: int = 50, batch_size: int = 64,
                progress: bool = False, classes: Sequence[str | int] | None = None) -> Profile:
        """Select each class's most confident correct samples and sum its contributions over them; `classes`
        (names or output positions): only those."""

    def profile_stream(self, model: nn.Module, samples: Any, samples_per_class: int = 50, batch_size: int = 64,
                       progress: bool = False, classes: Sequence[str | int] | None = None
                       ) -> tuple[ProfilePlan, Iterator[ClassRecord]]:
        """`profile` as its plan and its classes' records, computed as they are consumed (what a profile file is
        written from); by default the profile computed whole."""
        return as_records(self.profile(model, samples, samples_per_class, batch_size, progress, classes))

    @abstractmethod
    def pairs(self, model: nn.Module) -> int:
        """(output, input) channel pairs of the layers a profile sums over: the values of one class's record."""

    @abstractmethod
    def check_profile(self, model: nn.Module, profile: Profile, spec: Any = None) -> None:
        """Refuse a profile of another model, or whose layers and sums do not fit this model."""

    @abstractmethod
    def channels(self, model: nn.Module, spec: Any) -> Feeds:
        """The model's channel graph: which producer channels feed each layer's inputs."""

    @abstractmethod
    def locate(self, model: nn.Module, profile: Profile, thresholds: Thresholds, graph: Feeds,
               flatten: FlattenRule) -> ComponentMasks:
        """The masks of every class in every layer (core `walk` with this kind's layers and graph)."""

    @abstractmethod
    def cut(self, model: nn.Module, masks: ComponentMasks, task: list[int], graph: Feeds | None,
            spec: Any) -> tuple[nn.Module, Cut]:
        """The standalone component of `model` (inputs of `spec`) for `task` and what it keeps (`model` is not
        changed); `graph`: the model's channel graph when one was traced already."""

    @abstractmethod
    def component_architecture(self, source: Manifest, component: nn.Module, task: list[int]) -> dict[str, Any]:
        """The architecture record of a component cut from a model of manifest `source`."""

    @abstractmethod
    def reconstruct(self, component: nn.Module, source: nn.Module, cut: Cut, samples: Any,
                    ridge: float) -> Reconstruction:
        """Re-fit the component's layers, without gradients, to the source's outputs on `samples`."""

    @abstractmethod
    def validation(self, train: Any, positions: list[int], profile: Profile, seed: int = 0) -> Any:
        """Samples of the task (model outputs `positions`) that `--auto` judges α/β on: never test samples,
        never the profile's."""

    def auto_grid(self, step: float) -> list[Thresholds]:
        """The α/β points `--auto` tries at `step`: the paper's layout, conv (α, β) and linear (α + 0.1, β + 0.1)."""
        return grid_of(*search_grid(step))

    @abstractmethod
    def search(self, model: nn.Module, profile: Profile, task: list[int], validation: Any, max_drop: float,
               grid: Sequence[Thresholds], samples: Any | None, ridge: float, flatten: FlattenRule, graph: Feeds,
               progress: bool = False) -> SearchResult:
        """`--auto`: core `search` over this kind's candidates; the result holds the component built (and
        re-fitted on `samples` when given)."""

    @abstractmethod
    def scale(self, model: nn.Module, samples: Any, spec: Any, progress: bool = False) -> tuple[nn.Module, list[float]]:
        """Parameter scaling on the component's own task samples: a scaled copy and the factors."""

    @abstractmethod
    def fit_gate(self, calibration: Calibration, model: nn.Module, samples: Any, spec: Any) -> dict[str, torch.Tensor]:
        """A gate's statistics for one (scaled) component, from its own samples."""

    def fit_joint(self, models: Sequence[nn.Module], samples: Sequence[Any], targets: Sequence[int],
                  spec: Any) -> dict[str, Any]:
        """A joint head over the components' features, fitted in closed form on each one's own `samples`
        (core/joint.py); a kind without one refuses."""
        raise ModellegoError(f"{self.name} assemblies have no joint head; choose one of "
                             f"{', '.join(c.value for c in self.calibrations)}")

    @abstractmethod
    def assemble(self, models: Sequence[nn.Module], spec: Any, mode: AssemblyMode, targets: Sequence[int],
                 calibration: Calibration, stats: Sequence[dict[str, torch.Tensor]] | dict | None,
                 temperature: float) -> nn.Module:
        """One model answering the union of the components' outputs (`targets`: output j → class), calibrated
        by `calibration` with its fitted `stats` (a gate's per component; a joint head's record)."""

    @abstractmethod
    def assembly_architecture(self, members: Sequence[Brick], mode: AssemblyMode, model: nn.Module,
                              num_classes: int) -> dict[str, Any]:
        """The architecture record of an assembly of `members`."""

    def export_inputs(self, samples: Any, count: int) -> ExportInputs:
        """About `count` of `samples` as the inputs an exported model takes (what `export` runs both models on);
        a kind without an exportable forward pass refuses."""
        raise ModellegoError(f"{self.name.upper()} models cannot be exported")

    # --- shared ----------------------------------------------------------------------------------------------------

    def default_reconstruction_per_class(self, model: nn.Module, profile: Profile, task: list[int]) -> int | None:
        """How many training samples per class a re-fit reads when the user does not say: None, the profile's
        own samples of the task (a kind whose re-fits need more says how many)."""
        return None

    def check_profile_samples(self, profile: Profile, train: Any) -> None:
        """Refuse a profile whose sample positions fall outside `train` (positions as `subset` takes them)."""
        profile.check_samples(len(train))

    def reconstruction_samples(self, train: Any, profile: Profile, task: list[int], per_class: int | None = None,
                               seed: int = 0, model: nn.Module | None = None) -> Any:
        """The samples reconstruction re-fits on: with `per_class`, that many of each task class drawn with `seed`
        from the training samples (all of a class when it has fewer); without, the kind's default for `model`
        (`default_reconstruction_per_class`), else the profile's own samples of the task's classes. `task`: rows
        of the profile."""
        if per_class is None and model is not None:
            per_class = self.default_reconstruction_per_class(model, profile, task)
        if per_class is None and profile.dataset == train.name:
            chosen = torch.isin(profile.sample_labels, torch.tensor(task))
            return self.subset(train, profile.samples[chosen].sort().values)
        count = per_class or profile.samples_per_class
        generator = torch.Generator().manual_seed(seed)
        picked = []
        for label in (profile.output_positions[row] for row in task):
            members = torch.nonzero(train.targets == label).flatten()
            picked.append(members[torch.randperm(len(members), generator=generator)[:count]])
        return self.subset(train, self.positions(train, torch.cat(picked).sort().values))

    def positions(self, samples: Any, rows: torch.Tensor) -> torch.Tensor:
        """The positions (as `subset` takes them) of the samples at `rows` of `samples`."""
        return rows
