"""A small Vision Transformer for 28×28 / 32×32 images (issue 27): patches of 4 pixels, a class token, 6
pre-norm blocks of width 128 with 4 heads of 32 features and MLPs of 256 neurons. It trains on Fashion-MNIST on
a CPU in minutes. Its blocks are the method's units (core.tokens), so it can be taken apart and assembled."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modellego.core.blocks import HeadAttention, TokenMLP, sliced_linear
from modellego.core.contributions import TokenLinear
from modellego.models.common import scaled, torchvision_neurons

__all__ = ["ViT", "vit"]

TRANSFORMER_BUILDERS = ("vit", "swin")
TRANSFORMER_PREFIXES = ("torchvision:vit_", "torchvision:swin_", "torchvision:maxvit_", "timm:vit_",
                        "timm:deit_")  # their blocks become units


def is_transformer_builder(builder: object) -> bool:
    """Whether `builder` makes a Transformer modellego takes apart (the zoo's vit and swin, torchvision's ViTs,
    Swins and MaxViT, timm's ViTs)."""
    return isinstance(builder, str) and (builder in TRANSFORMER_BUILDERS or builder.startswith(TRANSFORMER_PREFIXES))


PATCH = 4
GRID = 7          # the position embeddings' grid (28 / 4); other grids read it interpolated
HEAD_DIM = 32
DEPTH = 6
MLP_RATIO = 2


class Block(nn.Module):
    """`x + attn(norm1(x))`, then `x + mlp(norm2(x))`."""

    def __init__(self, width: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = HeadAttention(width, heads, HEAD_DIM)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = TokenMLP(width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Patch embedding (a Conv2d of stride = kernel = PATCH), class token, position embeddings, `depth` blocks,
    a final LayerNorm and the classifier `head` on the class token."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: float = 1.0, depth: int = DEPTH) -> None:
        super().__init__()
        dim = max(HEAD_DIM, scaled(128, width) // HEAD_DIM * HEAD_DIM)
        heads = dim // HEAD_DIM
        self.embed = nn.Conv2d(in_channels, dim, kernel_size=PATCH, stride=PATCH)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, dim, GRID, GRID) * 0.02)
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, MLP_RATIO * dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.embed(x)
        grid = patches.shape[2:]
        position = self.pos_embed if tuple(grid) == (GRID, GRID) else \
            F.interpolate(self.pos_embed, size=tuple(grid), mode="bilinear", align_corners=False)
        tokens = (patches + position).flatten(2).transpose(1, 2)
        tokens = torch.cat([(self.cls_token + self.cls_pos).expand(x.shape[0], -1, -1), tokens], dim=1)
        return self.head(self.norm(self.blocks(tokens))[:, 0])


def vit(in_channels: int = 3, num_classes: int = 10, width: float = 1.0) -> ViT:
    """The zoo's small ViT (width 128 × `width`, at least one head of 32 features)."""
    return ViT(in_channels, num_classes, width)


class TorchvisionAttention(HeadAttention):
    """torchvision's nn.MultiheadAttention inside a ViT encoder block, as heads: the same weights (its in_proj
    holds the queries, keys and values head by head, as `qkv` does) and the same outputs, called as it is."""

    legacy_names = {"in_proj_weight": "qkv.weight", "in_proj_bias": "qkv.bias",
                    "out_proj.weight": "proj.weight", "out_proj.bias": "proj.bias"}

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
                need_weights: bool = False) -> tuple[torch.Tensor, None]:
        return super().forward(query), None


def from_torchvision(model: nn.Module) -> nn.Module:
    """torchvision's VisionTransformer, SwinTransformer or MaxVit with every block's attention and MLP as units
    (in place; the outputs stay the same). Weights saved with torchvision's names load through `legacy_names`."""
    from torchvision.models.vision_transformer import EncoderBlock

    from modellego.models.maxvit import from_torchvision_maxvit
    from modellego.models.swin import from_torchvision_swin

    from_torchvision_swin(model)
    from_torchvision_maxvit(model)

    for block in model.modules():
        if not isinstance(block, EncoderBlock):
            continue
        attention, mlp = block.self_attention, block.mlp
        width, heads = attention.embed_dim, attention.num_heads
        units = TorchvisionAttention(width, heads, width // heads)
        with torch.no_grad():  # the queries, keys and values are one weight of the attention, not a Linear
            units.qkv.weight.copy_(attention.in_proj_weight)
            units.qkv.bias.copy_(attention.in_proj_bias)
        units.proj = sliced_linear(attention.out_proj, None, None, TokenLinear)
        block.self_attention, block.mlp = units, torchvision_neurons(mlp)
    return model


def renamed_weights(network: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`weights` with the names of modules that carry `legacy_names` (old suffix → new) in `network`'s names."""
    renames = {}
    for name, module in network.named_modules():
        for old, new in getattr(module, "legacy_names", {}).items():
            renames[f"{name}.{old}" if name else old] = f"{name}.{new}" if name else new
    return {renames.get(key, key): value for key, value in weights.items()}


class TimmAttention(HeadAttention):
    """timm's Attention of a plain ViT block (no gate, no query/key norms) as heads: the same weights and names
    (`qkv`, `proj`), called as timm's block calls it."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("modellego's attention units attend to every token; this model passes a mask")
        return super().forward(x)


def from_timm(model: nn.Module) -> nn.Module:
    """timm's ViT-style model with each block's plain attention and MLP as units (in place; the same outputs and
    state-dict names). Blocks with anything else in them (gates, query/key norms, a norm inside the MLP) stay as
    timm built them, and the support check says why they cannot be taken apart."""
    try:
        from timm.layers import Mlp
        from timm.layers.attention import Attention
    except ImportError:
        return model
    for name, module in list(model.named_modules()):
        attention, mlp = getattr(module, "attn", None), getattr(module, "mlp", None)
        if type(attention) is not Attention or type(mlp) is not Mlp:
            continue
        plain = (getattr(attention, "gate", None) is None and all(isinstance(getattr(attention, part), nn.Identity)
                 for part in ("q_norm", "k_norm", "norm")) and isinstance(mlp.norm, nn.Identity)
                 and isinstance(mlp.act, nn.GELU) and attention.qkv.out_features == 3 * attention.proj.in_features)
        if not plain:
            continue
        units = TimmAttention(attention.qkv.in_features, attention.num_heads, attention.head_dim)
        units.qkv, units.proj = (sliced_linear(attention.qkv, None, None, TokenLinear),
                                  sliced_linear(attention.proj, None, None, TokenLinear))
        neurons = TokenMLP(mlp.fc1.in_features, mlp.fc1.out_features)
        neurons.fc1, neurons.fc2 = (sliced_linear(mlp.fc1, None, None, TokenLinear),
                                    sliced_linear(mlp.fc2, None, None, TokenLinear))
        neurons.act = mlp.act
        module.attn, module.mlp = units, neurons
    return model

