"""Model kinds: the plug-ins that say what differs between CNNs, GCNs and, next, Transformers (`ModelKind`, in
`base`). The registry below is the one place a kind is looked up — by a file's architecture record (`kind_of`)
or by what `train` was asked for (`kind_for_request`); the first kind that claims one wins, CNN last (it claims
every record no other kind does, as files written before kinds existed are CNNs)."""

from __future__ import annotations

from typing import Any

from modellego.kinds.base import ExportInputs, ModelKind, Trained, TrainOptions
from modellego.kinds.cnn import CNN
from modellego.kinds.gcn import GCN
from modellego.kinds.transformer import Transformer

KINDS: tuple[ModelKind, ...] = (GCN(), Transformer(), CNN())


def kind_of(architecture: Any) -> ModelKind:
    """The kind whose manifests look like `architecture` (a manifest's architecture record)."""
    return next(kind for kind in KINDS if kind.owns(architecture))


def kind_for_request(builder: str, dataset: str) -> ModelKind:
    """The kind `train --model builder --data dataset` makes."""
    return next(kind for kind in KINDS if kind.handles(builder, dataset))


def kind_named(name: str) -> ModelKind:
    return next(kind for kind in KINDS if kind.name == name)


__all__ = ["KINDS", "ExportInputs", "ModelKind", "Trained", "TrainOptions", "kind_for_request", "kind_named", "kind_of"]
