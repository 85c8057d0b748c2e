"""modellego: make new CNN classifiers without training, by disassembling trained models into task-aware
components and assembling components into new models (Model LEGO, NeurIPS 2024)."""

from modellego import data, models
from modellego.errors import ModellegoError
from modellego.evaluate import count_flops, count_params, report
from modellego.modelfile import ClassRef, Manifest, load, read_manifest, save
from modellego.train import train_model

__version__ = "0.1.0"

__all__ = [
    "ClassRef", "Manifest", "ModellegoError", "count_flops", "count_params", "data", "load", "models",
    "read_manifest", "report", "save", "train_model",
]
