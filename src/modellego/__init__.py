"""modellego: make new classifiers without training, by disassembling trained models into task-aware components
and assembling components into new models (Model LEGO, NeurIPS 2024).

The method's core takes any nn.Module and any labelled data: `profile`, `locate`, `disassemble`, `assemble`,
`scale`. `modellego.commands` wraps it with files, manifests and datasets by name (one function per command);
`modellego.kinds` holds what differs between model kinds (CNNs, GCNs)."""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version
from typing import Any

try:
    __version__ = _version("modellego")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

# Imported on first use (PEP 562), so that `modellego --version` and `--help` answer without importing torch.
_SUBMODULES = ("commands", "data", "models")
_EXPORTS = {
    "assemble": "modellego.core.assemble", "scale": "modellego.core.assemble", "disassemble": "modellego.core.api",
    "count_flops": "modellego.core.evaluate", "count_params": "modellego.core.evaluate",
    "PAPER": "modellego.core.locate", "ComponentMasks": "modellego.core.locate", "Thresholds": "modellego.core.locate",
    "locate": "modellego.core.api", "Profile": "modellego.core.profile", "profile": "modellego.core.profile",
    "search_thresholds": "modellego.core.api", "ModellegoError": "modellego.errors",
    "Brick": "modellego.io.manifest", "ClassRef": "modellego.io.manifest", "Manifest": "modellego.io.manifest",
    "load_masks": "modellego.io.masks", "save_masks": "modellego.io.masks", "load": "modellego.io.modelfile",
    "read_manifest": "modellego.io.modelfile", "save": "modellego.io.modelfile",
    "load_profile": "modellego.io.profiles", "save_profile": "modellego.io.profiles",
    "Box": "modellego.box", "finetune": "modellego.kinds.cnn", "train_model": "modellego.kinds.cnn", "list_models": "modellego.models",
    "export": "modellego.commands.export",
}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        value = importlib.import_module(f"modellego.{name}")
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    else:
        raise AttributeError(f"module 'modellego' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_SUBMODULES, *_EXPORTS})


__all__ = [
    "PAPER", "Box", "Brick", "ClassRef", "ComponentMasks", "Manifest", "ModellegoError", "Profile", "Thresholds",
    "assemble", "commands", "count_flops", "count_params", "data", "disassemble", "export", "finetune", "list_models", "load",
    "load_masks", "load_profile", "locate", "models", "profile", "read_manifest", "save", "save_masks",
    "save_profile", "scale", "search_thresholds", "train_model",
]
