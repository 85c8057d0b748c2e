"""modellego: make new CNN classifiers without training, by disassembling trained models into task-aware
components and assembling components into new models (Model LEGO, NeurIPS 2024).

The method's core takes any nn.Module and any labelled data: `profile`, `locate`, `disassemble`, `assemble`,
`scale`. `modellego.pipeline` wraps it with files, manifests and datasets by name (one function per command)."""

from importlib.metadata import PackageNotFoundError, version as _version

from modellego import data, models, pipeline
from modellego.assembly import assemble, scale
from modellego.disassembly import disassemble
from modellego.errors import ModellegoError
from modellego.evaluate import count_flops, count_params
from modellego.masks import PAPER, ComponentMasks, Thresholds, locate
from modellego.modelfile import Brick, ClassRef, Manifest, load, read_manifest, save
from modellego.models import list_models
from modellego.profiles import Profile, profile
from modellego.search import search_thresholds
from modellego.train import finetune, train_model

try:
    __version__ = _version("modellego")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "PAPER", "Brick", "ClassRef", "ComponentMasks", "Manifest", "ModellegoError", "Profile", "Thresholds",
    "assemble", "count_flops", "count_params", "data", "disassemble", "finetune", "list_models", "load", "locate",
    "models", "pipeline", "profile", "read_manifest", "save", "scale", "search_thresholds", "train_model",
]
