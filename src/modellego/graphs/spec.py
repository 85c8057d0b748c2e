"""What a graph model takes as input and how its architecture is recorded in a manifest. Plain data: importing
this module does not import torch_geometric, so that manifests of graph models can be read without it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from modellego.checks import Invalid, integer, mapping, number, sequence, show, string

GCN = "gcn"
GCN_PARALLEL = "gcn-parallel"
GRAPH_BUILDERS = (GCN, GCN_PARALLEL)
GRAPH_DATASETS = ("sbm", "karate", "cora", "citeseer", "pubmed")

MAX_FEATURES = 1 << 20
MAX_HIDDEN_LAYERS = 64
MAX_HIDDEN = 1 << 16
MAX_MEMBERS = 256


@dataclass(frozen=True)
class GraphSpec:
    """Node features of a graph: `features` per node (any number of nodes and edges)."""

    features: int

    def to_dict(self) -> dict:
        return {"kind": "graph", "features": self.features}

    @classmethod
    def from_dict(cls, data: dict) -> "GraphSpec":
        return cls(int(data["features"]))

    def describe(self) -> str:
        return f"graph nodes with {self.features} features"


def is_graph_architecture(architecture: Any) -> bool:
    """Whether a manifest's architecture record is a graph model's."""
    return isinstance(architecture, dict) and architecture.get("builder") in GRAPH_BUILDERS


def graph_input_spec(value: Any, field: str) -> GraphSpec:
    """Check a graph model's input record."""
    data = mapping(value, field)
    if data.get("kind") != "graph":
        raise Invalid(f"{field}.kind must be 'graph' for a graph model, got {show(data.get('kind'))}")
    return GraphSpec(integer(data.get("features"), f"{field}.features", 1, MAX_FEATURES))


def graph_architecture(value: Any, field: str, spec: GraphSpec, level: int = 0) -> dict[str, Any]:
    """Check a graph model's architecture record: a GCN (in_features, hidden sizes, classes, dropout) or
    GCNs side by side (a parallel assembly)."""
    data = mapping(value, field)
    builder = string(data.get("builder"), f"{field}.builder", 100)
    integer(data.get("num_classes"), f"{field}.num_classes", 1, 100_000)
    if builder == GCN_PARALLEL:
        if level > 0:
            raise Invalid(f"{field} nests parallel graph assemblies; assemble the components themselves")
        members = sequence(data.get("members"), f"{field}.members", 2, MAX_MEMBERS)
        for i, member in enumerate(members):
            graph_architecture(member, f"{field}.members[{i}]", spec, level + 1)
        return data
    if builder != GCN:
        raise Invalid(f"{field}.builder {show(builder)} is not a graph model")
    features = integer(data.get("in_features"), f"{field}.in_features", 1, MAX_FEATURES)
    if features != spec.features:
        raise Invalid(f"{field}.in_features is {features} but the input has {spec.features} features")
    for i, size in enumerate(sequence(data.get("hidden"), f"{field}.hidden", 0, MAX_HIDDEN_LAYERS)):
        integer(size, f"{field}.hidden[{i}]", 1, MAX_HIDDEN)
    number(data.get("dropout", 0.0), f"{field}.dropout", 0.0, 1.0)
    return data
