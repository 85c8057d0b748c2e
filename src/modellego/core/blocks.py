"""A Transformer's blocks as the method sees them (docs/method.md): attention whose heads are units
(`HeadAttention`), an MLP whose hidden neurons are units (`TokenMLP`), both made of `TokenLinear` layers; the
units found in a model, and a model shrunk to some of them. The residual stream between them is kept whole."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from modellego.core.contributions import TokenLinear
from modellego.errors import ModellegoError


class HeadAttention(nn.Module):
    """Multi-head self-attention whose heads are units: `qkv` (width → 3·heads·head_dim: the queries, keys and
    values, each head's `head_dim` rows contiguous within each third) and `proj` (heads·head_dim → width).
    `head_parameters` names further parameters with one slice per head, and the dimension the heads are on."""

    head_parameters: tuple[tuple[str, int], ...] = ()

    def __init__(self, width: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = TokenLinear(width, 3 * heads * head_dim)
        self.proj = TokenLinear(heads * head_dim, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(attended.transpose(1, 2).reshape(batch, tokens, self.heads * self.head_dim))

    def head_flops(self, tokens: int) -> int:
        """FLOPs of one head's attention itself (QKᵀ and the weighted values, not `qkv` and `proj`) over
        `tokens`: each query attends to every token here; a windowed attention's to its window."""
        return 4 * tokens * tokens * self.head_dim

    def keep_heads(self, indices: torch.Tensor) -> None:
        """Keep only the heads `indices` (sorted), in place: their query/key/value rows, projection columns and
        slices of the `head_parameters` (a position bias per head, a scale per head)."""
        rows = unit_rows(Unit("", "heads", "", "", self.heads, self.head_dim),
                         torch.zeros(self.heads, dtype=torch.bool).index_fill_(0, indices, True))
        self.qkv = sliced_linear(self.qkv, torch.nonzero(rows).flatten(), None)
        self.proj = sliced_linear(self.proj, None, torch.nonzero(rows[: self.heads * self.head_dim]).flatten())
        for name, dim in self.head_parameters:
            owner, _, attribute = name.rpartition(".")
            module = self.get_submodule(owner)
            kept = getattr(module, attribute).detach().index_select(dim, indices)
            setattr(module, attribute, nn.Parameter(kept))
        self.heads = len(indices)


class TokenMLP(nn.Module):
    """A block's MLP, whose hidden neurons are units: `fc1` (width → hidden), GELU, `fc2` (hidden → width)."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = TokenLinear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = TokenLinear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class StreamLinear(TokenLinear):
    """A Linear on tokens between blocks that changes the residual stream's width (Swin's PatchMerging reads
    `fold` neighbouring tokens' features side by side, [fold · width] → new width). It is kept whole; locating
    carries the stream features a class relies on back through it (docs/method.md, "Locating")."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 fold: int = 1) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.fold = fold


class StreamConv2d(nn.Conv2d):
    """A convolution between blocks that changes the residual stream's width (the 1×1 shortcut of a MaxViT
    stage's first MBConv). It is kept whole; locating carries the stream mask back through it as through a
    `StreamLinear` of fold 1."""

    fold = 1


@dataclass(frozen=True)
class Unit:
    """One block's cuttable group: its heads (`reader` qkv, `writer` proj, `group` = head_dim features each) or
    its MLP neurons (`reader` fc1, `writer` fc2, one feature each); `size` units."""

    module: str
    kind: str  # "heads" or "neurons"
    reader: str
    writer: str
    size: int
    group: int


def units(model: nn.Module) -> list[Unit]:
    """The model's heads and MLP neurons, block by block in module order."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, HeadAttention):
            found.append(Unit(name, "heads", f"{name}.qkv", f"{name}.proj", module.heads, module.head_dim))
        elif isinstance(module, TokenMLP):
            found.append(Unit(name, "neurons", f"{name}.fc1", f"{name}.fc2", module.fc1.out_features, 1))
    return found


def is_transformer(model: nn.Module) -> bool:
    """Whether `model` is built of the blocks this module knows how to take apart."""
    return any(isinstance(module, (HeadAttention, TokenMLP)) for module in model.modules())


def unit_rows(unit: Unit, kept: torch.Tensor) -> torch.Tensor:
    """The reader's output rows (a bool mask) of the kept units `kept` [..., size]: a head's rows in each of the
    queries, keys and values; a neuron's one row."""
    if unit.kind == "neurons":
        return kept
    per_head = kept.unsqueeze(-1).expand(*kept.shape, unit.group).reshape(*kept.shape[:-1], -1)
    return torch.cat([per_head] * 3, dim=-1)


def sliced_linear(source: nn.Linear, rows: torch.Tensor | None, columns: torch.Tensor | None,
                  kind: type[nn.Linear] | None = None) -> nn.Linear:
    """A copy of `source` keeping `rows` (outputs) and `columns` (inputs); None keeps all. The copy is of `kind`
    (default: the source's class), so that a plain Linear can become a TokenLinear."""
    weight = source.weight.detach()
    weight = weight if rows is None else weight[rows]
    weight = weight if columns is None else weight[:, columns]
    layer = (kind or type(source))(weight.shape[1], weight.shape[0], bias=source.bias is not None,
                                   device=weight.device, dtype=weight.dtype)
    if isinstance(layer, StreamLinear):
        layer.fold = getattr(source, "fold", 1)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if source.bias is not None:
            layer.bias.copy_(source.bias.detach() if rows is None else source.bias.detach()[rows])
    return layer


def shrink(model: nn.Module, kept: dict[str, torch.Tensor]) -> None:
    """Keep, in place, only the units `kept[module]` (indices, sorted) of each HeadAttention / TokenMLP named."""
    modules = dict(model.named_modules())
    for name, indices in kept.items():
        module = modules[name]
        if isinstance(module, HeadAttention):
            module.keep_heads(indices)
        elif isinstance(module, TokenMLP):
            module.fc1 = sliced_linear(module.fc1, indices, None)
            module.fc2 = sliced_linear(module.fc2, None, indices)
        else:
            raise ModellegoError(f"{name} is not an attention or MLP block of the model")


def unit_sizes(model: nn.Module) -> dict[str, int]:
    """Heads or neurons per block, by module name (what a component's architecture records)."""
    return {unit.module: unit.size for unit in units(model)}


