"""torchvision's MaxViT (`maxvit_t`) with its attention layers as the method's units: each block- and
grid-attention's heads (with their column of the relative position bias) and each MLP's neurons. The MBConv
convolutions between them are kept whole; the 1×1 convolution of a stage's first MBConv shortcut, which changes
the stream's width, is a `StreamConv2d`, and so is the Linear before the classifier (a `StreamLinear`)."""

from __future__ import annotations

import torch
from torch import nn

from modellego.core.blocks import HeadAttention, StreamConv2d, StreamLinear, TokenMLP, sliced_linear
from modellego.core.contributions import TokenLinear
from modellego.models.common import position_bias, relative_position_index

__all__ = ["PartitionAttention", "PartitionMLP", "from_torchvision_maxvit"]


class PartitionAttention(HeadAttention):
    """torchvision's RelativePositionalMultiHeadAttention as heads, on partitioned tokens [B, G, P, D]: the same
    weights (torchvision's `to_qkv` / `merge` load as `qkv` / `proj`) and outputs. Its keys are scaled by the
    source's stream width, which a cut does not change; each head keeps its column of the position bias."""

    head_parameters = (("relative_position_bias_table", 1),)

    legacy_names = {"to_qkv.weight": "qkv.weight", "to_qkv.bias": "qkv.bias", "merge.weight": "proj.weight",
                    "merge.bias": "proj.bias"}

    def __init__(self, width: int, heads: int, head_dim: int, partition: int) -> None:
        super().__init__(width, heads, head_dim)
        self.partition, self.scale = partition, width ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * partition - 1) ** 2, heads))
        area = partition ** 2  # torchvision's index is [area, area]
        self.register_buffer("relative_position_index", relative_position_index(partition, partition).view(area, area))

    def head_flops(self, tokens: int) -> int:
        return 4 * tokens * self.partition ** 2 * self.head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, groups, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, groups, tokens, 3, self.heads, self.head_dim).permute(3, 0, 1, 4, 2, 5)
        bias = position_bias(self.relative_position_bias_table, self.relative_position_index, self.partition ** 2)
        scores = qkv[0] @ (qkv[1] * self.scale).transpose(-2, -1) + bias
        attended = scores.softmax(dim=-1) @ qkv[2]
        return self.proj(attended.permute(0, 1, 3, 2, 4).reshape(batch, groups, tokens, self.heads * self.head_dim))


class PartitionMLP(TokenMLP):
    """MaxViT's MLP (LayerNorm, Linear, GELU, Linear, Dropout) as neurons, its norm inside; torchvision's names
    load through `legacy_names`."""

    legacy_names = {"0.weight": "norm.weight", "0.bias": "norm.bias", "1.weight": "fc1.weight",
                    "1.bias": "fc1.bias", "3.weight": "fc2.weight", "3.bias": "fc2.bias"}

    def __init__(self, width: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__(width, hidden)
        self.norm, self.dropout = nn.LayerNorm(width), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(super().forward(self.norm(x)))


def from_torchvision_maxvit(model: nn.Module) -> nn.Module:
    """torchvision's MaxVit with every partition attention's heads and MLP neurons as units, each stage's
    shortcut convolution a `StreamConv2d` and the classifier's hidden Linear a `StreamLinear` (in place; the
    outputs stay the same, torchvision's weights load through `legacy_names`)."""
    from torchvision.models import maxvit

    for module in list(model.modules()):
        if isinstance(module, maxvit.PartitionAttentionLayer):
            attention, mlp = module.attn_layer[1], module.mlp_layer
            units = PartitionAttention(attention.to_qkv.in_features, attention.n_heads, attention.head_dim,
                                       attention.size)
            units.scale = attention.scale_factor
            units.qkv, units.proj = (sliced_linear(attention.to_qkv, None, None, TokenLinear),
                                     sliced_linear(attention.merge, None, None, TokenLinear))
            neurons = PartitionMLP(mlp[1].in_features, mlp[1].out_features, mlp[4].p)
            neurons.norm = mlp[0]
            neurons.fc1, neurons.fc2 = (sliced_linear(mlp[1], None, None, TokenLinear),
                                        sliced_linear(mlp[3], None, None, TokenLinear))
            with torch.no_grad():
                units.relative_position_bias_table.copy_(attention.relative_position_bias_table)
            module.attn_layer[1], module.mlp_layer = units, neurons
        elif isinstance(module, maxvit.MBConv) and isinstance(module.proj, nn.Sequential):
            shortcut = module.proj[-1]
            module.proj[-1] = StreamConv2d(shortcut.in_channels, shortcut.out_channels, 1, bias=shortcut.bias is not None)
            module.proj[-1].load_state_dict(shortcut.state_dict())
        elif isinstance(module, maxvit.MaxVit):
            hidden = module.classifier[3]
            module.classifier[3] = sliced_linear(hidden, None, None, StreamLinear)
    return model
