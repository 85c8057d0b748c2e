"""modellego: make new CNN classifiers without training, by disassembling trained models into task-aware
components and assembling components into new models (Model LEGO, NeurIPS 2024)."""

from modellego import data, models
from modellego.errors import ModellegoError
from modellego.evaluate import count_flops, count_params, report
from modellego.modelfile import ClassRef, Manifest, load, read_manifest, save
from modellego.train import finetune, train_model
from modellego.profiles import Profile, profile
from modellego.masks import ComponentMasks, locate
from modellego.disassembly import Component, auto_disassemble, disassemble
from modellego.assembly import assemble, scale

__version__ = "0.1.0"

__all__ = [
    "ClassRef", "Component", "ComponentMasks", "Manifest", "ModellegoError", "Profile", "assemble",
    "auto_disassemble", "count_flops", "count_params", "data", "disassemble", "finetune", "load", "locate",
    "models", "profile", "read_manifest", "report", "save", "scale", "train_model",
]
