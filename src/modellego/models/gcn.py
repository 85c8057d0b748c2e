"""GCN models: stacked torch_geometric GCNConv layers, and GCNs side by side (a parallel assembly). Importing this
module does not import torch_geometric (building a GCN does), so that graph manifests can be read without it."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modellego.core.modules import MergeOutputs
from modellego.data.graphs import require

GCN_BUILDER = "gcn"
GCN_PARALLEL = "gcn-parallel"
GRAPH_BUILDERS = (GCN_BUILDER, GCN_PARALLEL)
DEFAULT_HIDDEN = (64, 64)


def is_graph_architecture(architecture: Any) -> bool:
    """Whether a manifest's architecture record is a graph model's."""
    return isinstance(architecture, dict) and architecture.get("builder") in GRAPH_BUILDERS


class GCN(nn.Module):
    """`model(x, edge_index)` → logits per node [N, classes]: GCNConv layers with ReLU between them and dropout
    before each (active in training only); the last layer's outputs are the classes."""

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int, dropout: float = 0.5) -> None:
        require()
        from torch_geometric.nn import GCNConv

        super().__init__()
        sizes = [in_features, *hidden, num_classes]
        self.convs = nn.ModuleList(GCNConv(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.dropout = dropout
        self.in_features = in_features

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        for position, conv in enumerate(self.convs):
            x = F.dropout(x, self.dropout, self.training)
            x = conv(x, edge_index)
            if position < len(self.convs) - 1:
                x = F.relu(x)
        return x

    def architecture(self) -> dict[str, Any]:
        """The manifest record that rebuilds this model (sizes read from its weights)."""
        weights = [conv.lin.weight for conv in self.convs]
        return {"builder": GCN_BUILDER, "in_features": weights[0].shape[1],
                "hidden": [w.shape[0] for w in weights[:-1]], "num_classes": weights[-1].shape[0],
                "dropout": self.dropout}

    def structure_error(self, num_classes: int) -> str | None:
        """Why the layers do not chain into `num_classes` outputs, or None (checked on the meta device)."""
        previous = self.in_features
        for position, conv in enumerate(self.convs):
            out_size, in_size = conv.lin.weight.shape
            if in_size != previous:
                given = f"convs.{position - 1} gives" if position else "the input has"
                return f"convs.{position} takes {in_size} features but {given} {previous}"
            if conv.bias is not None and conv.bias.shape[0] != out_size:
                return f"convs.{position}.bias has {conv.bias.shape[0]} entries for {out_size} outputs"
            previous = out_size
        if previous != num_classes:
            return f"it outputs {previous} classes per node but the manifest lists {num_classes}"
        return None


class GraphParallel(nn.Module):
    """GCN components side by side on the same graph, logits concatenated, then merged into the union of their
    classes (a class two components share gets the max of their logits)."""

    def __init__(self, members: Sequence[nn.Module], targets: Sequence[int]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.merge = MergeOutputs(targets)

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        return self.merge(torch.cat([member(x, edge_index) for member in self.members], dim=1))

    def structure_error(self, num_classes: int) -> str | None:
        outputs = 0
        for position, member in enumerate(self.members):
            own = member.convs[-1].lin.weight.shape[0]
            problem = member.structure_error(own)
            if problem:
                return f"members.{position}: {problem}"
            outputs += own
        if self.merge.targets.shape[0] != outputs:
            return f"merge.targets has {self.merge.targets.shape[0]} entries for {outputs} member outputs"
        return None


def build(architecture: dict[str, Any]) -> nn.Module:
    """The (randomly initialised) model an architecture record describes."""
    if architecture["builder"] == GCN_PARALLEL:
        members = [build(member) for member in architecture["members"]]
        total = sum(int(member["num_classes"]) for member in architecture["members"])
        return GraphParallel(members, [0] * total)  # the targets are weights of the file, loaded after
    return GCN(int(architecture["in_features"]), [int(h) for h in architecture["hidden"]],
               int(architecture["num_classes"]), float(architecture.get("dropout", 0.0)))
