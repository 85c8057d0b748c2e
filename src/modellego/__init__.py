"""modellego: make new classifiers without training, by disassembling trained models into task-aware components
and assembling components into new models (Model LEGO, NeurIPS 2024).

The method's core takes any nn.Module and any labelled data: `profile`, `locate`, `disassemble`, `assemble`,
`scale`. `modellego.commands` wraps it with files, manifests and datasets by name (one function per command);
`modellego.kinds` holds what differs between model kinds (CNNs, GCNs)."""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from modellego import commands, data, models
from modellego.core.assemble import assemble, scale
from modellego.core.cut import disassemble
from modellego.core.evaluate import count_flops, count_params
from modellego.core.locate import PAPER, ComponentMasks, Thresholds, locate
from modellego.core.profile import Profile, profile
from modellego.core.search import search_thresholds
from modellego.errors import ModellegoError
from modellego.io.manifest import Brick, ClassRef, Manifest
from modellego.io.masks import load_masks, save_masks
from modellego.io.modelfile import load, read_manifest, save
from modellego.io.profiles import load_profile, save_profile
from modellego.kinds.cnn import finetune, train_model
from modellego.models import list_models

try:
    __version__ = _version("modellego")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "PAPER", "Brick", "ClassRef", "ComponentMasks", "Manifest", "ModellegoError", "Profile", "Thresholds",
    "assemble", "commands", "count_flops", "count_params", "data", "disassemble", "finetune", "list_models", "load",
    "load_masks", "load_profile", "locate", "models", "profile", "read_manifest", "save", "save_masks",
    "save_profile", "scale", "search_thresholds", "train_model",
]
