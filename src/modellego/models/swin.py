"""torchvision's Swin Transformers (`swin_t/s/b` and `swin_v2_t/s/b`) with their blocks as the method's units:
each shifted-window attention's heads (with their parts of the position bias, and V2's scales) and each MLP's
neurons. PatchMerging's reduction, which doubles the stream's width between stages, is kept whole (a
`StreamLinear`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from modellego.core.blocks import HeadAttention, StreamLinear, sliced_linear
from modellego.core.contributions import TokenLinear
from modellego.models.common import position_bias, relative_position_index, scaled, torchvision_neurons

__all__ = ["WindowAttention", "WindowAttentionV2", "from_torchvision_swin", "swin"]

HEAD_DIM = 16  # the zoo Swin's head width

MASKED = -100.0  # torchvision's score for a query and key from different regions of a shifted window


class WindowAttention(HeadAttention):
    """torchvision's ShiftedWindowAttention as heads: the same weights, names and outputs. Each head keeps its
    column of `relative_position_bias_table`. The queries, keys and values are computed by `qkv` as a module
    and the heads' outputs projected by `proj` as one (torchvision calls F.linear on their weights), so that a
    profile's hooks see them."""

    head_parameters = (("relative_position_bias_table", 1),)

    def __init__(self, width: int, heads: int, window: list[int], shift: list[int]) -> None:
        super().__init__(width, heads, width // heads)
        self.window_size, self.shift_size = list(window), list(shift)
        self.attention_dropout, self.dropout = 0.0, 0.0
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window[0] - 1) * (2 * window[1] - 1), heads))
        self.register_buffer("relative_position_index", relative_position_index(*window))

    def head_flops(self, tokens: int) -> int:
        return 4 * tokens * self.window_size[0] * self.window_size[1] * self.head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        rows, columns = self.window_size
        padded = F.pad(x, (0, 0, 0, (columns - width % columns) % columns, 0, (rows - height % rows) % rows))
        padded_height, padded_width = padded.shape[1:3]
        # no shift where the window covers the (padded) map already
        shift = [0 if rows >= padded_height else self.shift_size[0], 0 if columns >= padded_width else self.shift_size[1]]
        qkv = self._queries_keys_values(padded)  # per token: before the shift and partition, as torchvision's after
        if any(shift):
            qkv = torch.roll(qkv, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        across, down, area = padded_width // columns, padded_height // rows, rows * columns
        windows = qkv.reshape(batch, down, rows, across, columns, -1).permute(0, 1, 3, 2, 4, 5)
        windows = windows.reshape(batch * down * across, area, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        scores = self._scores(windows[0], windows[1]) + self._position_bias()
        if any(shift):
            scores = (scores.view(batch, down * across, self.heads, area, area)
                      + _shift_mask(padded_height, padded_width, self.window_size, shift, x).unsqueeze(1).unsqueeze(0)
                      ).view(-1, self.heads, area, area)
        weights = F.dropout(scores.softmax(dim=-1), self.attention_dropout, self.training)
        attended = (weights @ windows[2]).transpose(1, 2).reshape(batch, down, across, rows, columns, -1)
        attended = attended.permute(0, 1, 3, 2, 4, 5).reshape(batch, padded_height, padded_width, -1)
        if any(shift):
            attended = torch.roll(attended, shifts=(shift[0], shift[1]), dims=(1, 2))
        return F.dropout(self.proj(attended[:, :height, :width, :].contiguous()), self.dropout, self.training)

    def _queries_keys_values(self, x: torch.Tensor) -> torch.Tensor:
        return self.qkv(x)

    def _scores(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return (queries * self.head_dim ** -0.5) @ keys.transpose(-2, -1)

    def _bias_table(self) -> torch.Tensor:
        return self.relative_position_bias_table

    def _position_bias(self) -> torch.Tensor:
        return position_bias(self._bias_table(), self.relative_position_index, self.window_size[0] * self.window_size[1])


class Affine(nn.Module):
    """`x Wᵀ + b` held as weights, not as an nn.Linear: Swin V2's position-bias network reads the window's fixed
    offsets, not the image, so its layers are part of the heads, never profiled or cut as the method's layers."""

    def __init__(self, inputs: int, outputs: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(outputs, inputs))
        self.bias = nn.Parameter(torch.zeros(outputs)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class WindowAttentionV2(WindowAttention):
    """torchvision's ShiftedWindowAttentionV2 as heads: cosine attention with a learned scale per head
    (`logit_scale`) and a continuous position bias from a small network (`cpb_mlp`: 2 → 512 → one output per
    head), the keys' bias ignored, as torchvision does. The same weights, names and outputs; a head keeps its
    scale and its row of the network's last layer."""

    head_parameters = (("logit_scale", 0), ("cpb_mlp.2.weight", 0))

    def __init__(self, width: int, heads: int, window: list[int], shift: list[int], hidden: int = 512) -> None:
        super().__init__(width, heads, window, shift)
        del self.relative_position_bias_table  # V2 computes its table (`_bias_table`)
        self.logit_scale = nn.Parameter(torch.zeros(heads, 1, 1))
        self.cpb_mlp = nn.Sequential(Affine(2, hidden, True), nn.ReLU(), Affine(hidden, heads, False))
        self.register_buffer("relative_coords_table", _relative_coordinates(window))

    def head_flops(self, tokens: int) -> int:  # and the head's output of the position-bias network
        return super().head_flops(tokens) + 2 * self.cpb_mlp[2].weight.shape[1] * self.relative_coords_table[0, ..., 0].numel()

    def _queries_keys_values(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)
        if self.qkv.bias is None:
            return qkv
        width = self.heads * self.head_dim
        return qkv - F.pad(self.qkv.bias[width:2 * width], (width, width))

    def _scores(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        cosine = F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).transpose(-2, -1)
        return cosine * torch.clamp(self.logit_scale, max=math.log(100.0)).exp()

    def _bias_table(self) -> torch.Tensor:
        return self.cpb_mlp(self.relative_coords_table).view(-1, self.heads)

    def _position_bias(self) -> torch.Tensor:
        return 16 * torch.sigmoid(super()._position_bias())


def _relative_coordinates(window: list[int]) -> torch.Tensor:
    """Swin V2's input to its position-bias network: every offset in a window, scaled to ±8 and log-spaced."""
    offsets = [torch.arange(-(size - 1), size, dtype=torch.float32) / max(size - 1, 1) * 8 for size in window]
    table = torch.stack(torch.meshgrid(offsets, indexing="ij")).permute(1, 2, 0).unsqueeze(0)
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / 3.0


def _shift_mask(height: int, width: int, window: list[int], shift: list[int], like: torch.Tensor) -> torch.Tensor:
    """[windows, area, area]: 0 where a shifted window's query and key come from the same region of the map
    (before the cyclic shift), MASKED where they do not."""
    regions = like.new_zeros((height, width))
    bands = [((0, -window[axis]), (-window[axis], -shift[axis]), (-shift[axis], None)) for axis in (0, 1)]
    for number, ((top, bottom), (left, right)) in enumerate((row, column) for row in bands[0] for column in bands[1]):
        regions[top:bottom, left:right] = number
    regions = regions.view(height // window[0], window[0], width // window[1], window[1]).permute(0, 2, 1, 3)
    regions = regions.reshape(-1, window[0] * window[1])
    return (regions.unsqueeze(1) - regions.unsqueeze(2) != 0).to(like.dtype) * MASKED


def from_torchvision_swin(model: nn.Module) -> nn.Module:
    """torchvision's SwinTransformer (V1 or V2) with every block's attention heads and MLP neurons as units and
    every PatchMerging's reduction a `StreamLinear` (in place; the outputs and the state-dict names stay the
    same, MLP weights saved with torchvision's names load through `legacy_names`)."""
    from torchvision.models import swin_transformer as swin

    for module in list(model.modules()):
        if isinstance(module, swin.SwinTransformerBlock) and type(module.attn) in (swin.ShiftedWindowAttention,
                                                                                   swin.ShiftedWindowAttentionV2):
            module.attn, module.mlp = _window_heads(module.attn), torchvision_neurons(module.mlp)
        elif type(module) in (swin.PatchMerging, swin.PatchMergingV2):
            reduction = module.reduction  # its input is four neighbouring tokens' features side by side
            module.reduction = StreamLinear(reduction.in_features, reduction.out_features, reduction.bias is not None,
                                            reduction.weight.device, reduction.weight.dtype, fold=4)
            module.reduction.load_state_dict(reduction.state_dict())
    return model


def _window_heads(attention: nn.Module) -> WindowAttention:
    width, heads = attention.qkv.in_features, attention.num_heads
    if hasattr(attention, "cpb_mlp"):
        units: WindowAttention = WindowAttentionV2(width, heads, attention.window_size, attention.shift_size,
                                                   attention.cpb_mlp[0].out_features)
        with torch.no_grad():
            units.logit_scale.copy_(attention.logit_scale)
            for position in (0, 2):
                for part, value in attention.cpb_mlp[position].named_parameters():
                    getattr(units.cpb_mlp[position], part).copy_(value)
    else:
        units = WindowAttention(width, heads, attention.window_size, attention.shift_size)
        with torch.no_grad():
            units.relative_position_bias_table.copy_(attention.relative_position_bias_table)
    units.qkv, units.proj = (sliced_linear(attention.qkv, None, None, TokenLinear),
                             sliced_linear(attention.proj, None, None, TokenLinear))
    units.attention_dropout, units.dropout = attention.attention_dropout, attention.dropout
    return units


def swin(in_channels: int = 3, num_classes: int = 10, width: float = 1.0) -> nn.Module:
    """The zoo's small Swin Transformer for 28×28 / 32×32 images, built by torchvision's SwinTransformer and
    converted: patches of 2 px, two stages of two blocks (width 32 with 2 heads of 16, then 64 with 4), windows
    of 7 (a 28-px image's 14×14 map in four windows, the next stage's 7×7 in one), MLPs of twice the width."""
    from torchvision.models.swin_transformer import SwinTransformer

    embed = max(HEAD_DIM, scaled(32, width) // HEAD_DIM * HEAD_DIM)
    model = SwinTransformer(patch_size=[2, 2], embed_dim=embed, depths=[2, 2],
                            num_heads=[embed // HEAD_DIM, 2 * embed // HEAD_DIM], window_size=[7, 7], mlp_ratio=2.0,
                            num_classes=num_classes)
    model.features[0][0] = nn.Conv2d(in_channels, embed, kernel_size=2, stride=2)
    return from_torchvision_swin(model)
