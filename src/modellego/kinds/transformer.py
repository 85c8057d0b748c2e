"""Vision Transformers (issue 27): the zoo's ViT and Swin, torchvision's ViT and Swin builders and timm's ViT-style
ones, whose blocks' attention heads and MLP neurons are the units a component keeps (docs/method.md). Images in, logits out, as for CNNs: the data, training, prediction, scaling,
gates and parallel assembly are the CNN kind's; what differs is the method's middle — contributions over tokens,
locating units, cutting them, and the architecture record that rebuilds a component."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from modellego.core.assemble import AssemblyMode
from modellego.core.blocks import HeadAttention, TokenMLP, shrink, unit_sizes
from modellego.core.cut import Cut
from modellego.core.locate import ComponentMasks, FlattenRule, Thresholds
from modellego.core.profile import Profile
from modellego.core.search import UNIT_TOP, search_grid, unit_grid
from modellego.core.tokens import TokenCandidates, cut_units, locate_units
from modellego.data.spec import InputSpec
from modellego.errors import ModellegoError
from modellego.io.fields import Invalid, integer, mapping, string
from modellego.io.manifest import MAX_CHANNELS, MAX_NAME, Manifest
from modellego.kinds.cnn import CNN, PARALLEL
from modellego.models.vit import is_transformer_builder

MAX_UNITS = 4096  # units per block (heads or MLP neurons) a component record may name


def is_transformer_architecture(architecture: Any) -> bool:
    """Whether a manifest's architecture record is a Transformer's (or a parallel assembly of them)."""
    if not isinstance(architecture, dict):
        return False
    if architecture.get("builder") == PARALLEL:
        members = architecture.get("members")
        return isinstance(members, list) and bool(members) and all(map(is_transformer_architecture, members))
    return is_transformer_builder(architecture.get("builder"))


class Transformer(CNN):
    name = "transformer"
    unit = "image"
    default_mode = AssemblyMode.PARALLEL
    modes = (AssemblyMode.PARALLEL,)
    default_lr = 2e-3

    unsupported = {
        "--flatten": "a Transformer flattens nothing: its head reads the class token (ViT) or the tokens' mean (Swin)",
        "--alpha-conv": "every unit is a Linear layer's: use --alpha-fc and --beta-fc",
        "--beta-conv": "every unit is a Linear layer's: use --alpha-fc and --beta-fc",
    }

    def check_mode(self, mode: AssemblyMode) -> None:
        if mode not in self.modes:
            raise ModellegoError("Transformer components assemble in --mode parallel only: a padded merge would put "
                                 "the members' residual streams side by side, and every LayerNorm would normalise "
                                 "them together; use --mode parallel")

    # --- manifests -------------------------------------------------------------------------------------------------

    def owns(self, architecture: Any) -> bool:
        return is_transformer_architecture(architecture)

    def handles(self, builder: str, dataset: str) -> bool:
        return is_transformer_builder(builder)

    def check_architecture(self, value: Any, field: str, spec: Any) -> dict[str, Any]:
        data = super().check_architecture(value, field, spec)
        self._check_units(data, field)
        return data

    def _check_units(self, data: dict[str, Any], field: str) -> None:
        if data.get("builder") == PARALLEL:
            for position, member in enumerate(data["members"]):
                self._check_units(member, f"{field}.members[{position}]")
            return
        if "units" not in data:
            return
        record = mapping(data["units"], f"{field}.units")
        if len(record) > MAX_CHANNELS:
            raise Invalid(f"{field}.units names more than {MAX_CHANNELS} blocks")
        for name, count in record.items():
            string(name, f"{field}.units key", MAX_NAME)
            integer(count, f"{field}.units[{name!r}]", 1, MAX_UNITS)

    def build(self, architecture: dict[str, Any], spec: Any) -> nn.Module:
        model = super().build({key: value for key, value in architecture.items() if key != "units"}, spec)
        if "units" in architecture:  # a component: its blocks keep fewer heads / neurons than the builder's
            known = unit_sizes(model)
            for name, count in architecture["units"].items():
                if name not in known:
                    raise Invalid(f"architecture.units names {name!r}, which is not a block of {architecture['builder']}")
                if count > known[name]:
                    raise Invalid(f"architecture.units[{name!r}] is {count}, more than the {known[name]} the builder has")
            shrink(model, {name: torch.arange(count) for name, count in architecture["units"].items()})
        return model

    def structure_error(self, model: nn.Module, manifest: Manifest) -> str | None:
        """A block whose weights (the file's shapes) disagree with the heads or neurons its record names, in
        words, before the shape check's forward pass reports it as a reshape."""
        for name, module in model.named_modules():
            if isinstance(module, HeadAttention):
                width = module.heads * module.head_dim
                rows, columns = module.qkv.weight.shape[0], module.proj.weight.shape[1]
                if rows != 3 * width or columns != width:
                    return (f"{name} has {rows} query/key/value rows and {columns} projection columns, not those "
                            f"of the {module.heads} heads of {module.head_dim} its architecture.units record names")
            elif isinstance(module, TokenMLP) and module.fc1.weight.shape[0] != module.fc2.weight.shape[1]:
                return (f"{name} has {module.fc1.weight.shape[0]} neurons in fc1 but {module.fc2.weight.shape[1]} "
                        "in fc2; its weights and its architecture.units record disagree")
        record = manifest.architecture.get("units", {})
        for name, size in unit_sizes(model).items():
            if name in record and record[name] != size:
                return (f"{name} holds {size} units in its weights but its architecture.units record names "
                        f"{record[name]}")
        return super().structure_error(model, manifest)

    # --- the method ------------------------------------------------------------------------------------------------

    def channels(self, model: nn.Module, spec: InputSpec) -> None:
        return None  # the units are found from the modules themselves (core.tokens.units)

    def locate(self, model: nn.Module, profile: Profile, thresholds: Thresholds, graph: None,
               flatten: FlattenRule) -> ComponentMasks:
        return locate_units(model, profile, thresholds)

    def cut(self, model: nn.Module, masks: ComponentMasks, task: list[int], graph: None,
            spec: InputSpec) -> tuple[nn.Module, Cut]:
        return cut_units(model, masks, task)

    def auto_grid(self, step: float) -> list[Thresholds]:
        """Every unit is a Linear layer's, so one (α, β) pair, each from 0 to 0.9: the residual stream is kept
        whole, which leaves small tasks meeting their target at the CNN grid's largest thresholds (docs/method.md)."""
        return unit_grid(*search_grid(step, UNIT_TOP, UNIT_TOP))

    def candidates(self, model: nn.Module, profile: Profile, task: list[int], validation: Dataset,
                   samples: Dataset | None, ridge: float, flatten: FlattenRule, graph: None) -> TokenCandidates:
        return TokenCandidates(model, profile, task, validation, samples, ridge)

    def component_architecture(self, source: Manifest, component: nn.Module, task: list[int]) -> dict[str, Any]:
        return dict(source.architecture, num_classes=len(task), units=unit_sizes(component))
