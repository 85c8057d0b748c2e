"""Per-sample contributions of a layer's input channels to its output channels.

For a parameter layer with weight W and input x (DESIGN.md, "Contribution"):

- Conv2d: ``C[b,o,i] = Σ_p Σ_u W[o,i,u] · xpad[b,i,s·p + d·u]`` over output positions p
  and kernel offsets u. The spatial sum is taken first: ``S[b,i,u] = Σ_p xpad[b,i,s·p+d·u]``
  are window sums of the input, so ``C[b,o,i] = Σ_u W[o,i,u] · S[b,i,u]`` and the
  B×O×I×H×W tensor is never built. Grouped convs only have pairs inside one group.
- Linear: ``C[b,o,i] = W[o,i] · x[b,i]`` (extra middle dims of x are summed first).
- TokenLinear (a Transformer's Linear on every token, docs/method.md): ``C[b,o,i] = Σ_t max(W[o,i]·x[b,t,i], 0)``,
  the positive part per token summed over the tokens.

Bias is ignored, and only the positive part ``C⁺ = max(C, 0)`` is returned.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from modellego.errors import ModellegoError

__all__ = ["TokenLinear", "contributions", "window_sums"]


class TokenLinear(nn.Linear):
    """An nn.Linear applied to every token of a sequence [B, T, I]. Its contribution of input i to output o is
    Σ_t max(W[o,i]·x[t,i], 0): the positive part per token, summed over the tokens (docs/method.md).

    `profiled_tokens` ("all", the default, or "class": the first token only) is the token set a profile sums
    over; "class" is there to measure the alternative (benchmarks/vit_tokens.py), files never record it."""

    profiled_tokens = "all"


def contributions(layer: nn.Module, x: Tensor) -> Tensor:
    """Return C⁺ = max(C, 0) of shape [B, O, I] for an nn.Conv2d or nn.Linear and its batched input x.

    I is the layer's full number of input channels/features; for grouped convs the pairs
    (o, i) in different groups are zero. Computed in x's dtype, on x's device, without grad.
    For Conv2d the result is a view laid out as [I, B, O] in memory (the layout the per-channel
    GEMMs write): transposing B·O·I values would cost more than computing them, and sums over
    samples do not need it. Call ``.contiguous()`` where a contiguous tensor is required.
    """
    return _contributions(layer, x, positive=True)


@torch.no_grad()
def class_sums(layer: nn.Module, x: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Σ over the samples of each class of C⁺, shape [K, O, I] in float64: a profile's increment for one batch.

    For nn.Linear no [B, O, I] tensor is built: max(w·s, 0) = max(w, 0)·max(s, 0) + min(w, 0)·min(s, 0) for
    scalars, so the class sum is W⁺·Σ s⁺ + W⁻·Σ s⁻ (exact; a VGG head of 25088×4096 would need 26 GB per batch
    of 64 otherwise)."""
    if isinstance(layer, nn.Linear):
        _linear_contributions(layer, x[:1], positive=True)  # the same input checks
        tokens = x.reshape(x.shape[0], -1, x.shape[-1]).double()
        if isinstance(layer, TokenLinear):  # Σ_t max(w·x_t, 0) = w⁺·Σ_t x_t⁺ + w⁻·Σ_t x_t⁻, exactly
            tokens = tokens[:, :1] if layer.profiled_tokens == "class" else tokens
            summed_positive, summed_negative = tokens.clamp(min=0).sum(1), tokens.clamp(max=0).sum(1)
        else:  # the tokens (extra dims) summed first, then max(w·s, 0) = w⁺·s⁺ + w⁻·s⁻
            summed = tokens.sum(1)
            summed_positive, summed_negative = summed.clamp(min=0), summed.clamp(max=0)
        weight = layer.weight.detach().to(dtype=torch.float64, device=x.device)
        positive = torch.zeros(num_classes, tokens.shape[2], dtype=torch.float64, device=x.device)
        negative = torch.zeros_like(positive)
        positive.index_add_(0, labels.to(x.device), summed_positive)
        negative.index_add_(0, labels.to(x.device), summed_negative)
        return (weight.clamp(min=0).unsqueeze(0) * positive.unsqueeze(1)
                + weight.clamp(max=0).unsqueeze(0) * negative.unsqueeze(1))
    per_sample = contributions(layer, x)
    out = torch.zeros(num_classes, *per_sample.shape[1:], dtype=torch.float64, device=x.device)
    if num_classes == 1:  # one class per batch (a profile's pass): a plain sum, about twice as fast as index_add
        # summed over the batch in the [I, B, O] memory layout (see `contributions`), then viewed as [O, I]
        out[0] = per_sample.permute(2, 0, 1).double().sum(1).t()
        return out
    return out.index_add_(0, labels.to(x.device), per_sample.double())


def window_sums(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """Return S[b,i,u] = Σ_p xpad[b,i,s·p+d·u] of shape [B, I, kh, kw]: the input summed over each kernel offset's window.

    Padding contributes zeros, so S is x contracted with two small 0/1 matrices
    (rows hit by offset ui, columns hit by offset uj) — no padded copy, no unfold.
    """
    _check_conv(conv, x)
    with torch.no_grad():
        return _window_sums(x, conv)


def _contributions(layer: nn.Module, x: Tensor, *, positive: bool) -> Tensor:
    """The signed contribution C (positive=False) or its positive part C⁺ (positive=True), shape [B, O, I]."""
    with torch.no_grad():
        if isinstance(layer, nn.Conv2d):
            _check_conv(layer, x)
            return _conv_contributions(layer, x, positive)
        if isinstance(layer, nn.Linear):
            return _linear_contributions(layer, x, positive)
    raise ModellegoError(
        f"contributions are defined for nn.Conv2d and nn.Linear, not {_type_name(layer)}"
    )


def _type_name(layer: object) -> str:
    cls = type(layer)
    return f"nn.{cls.__name__}" if cls.__module__.startswith("torch.nn") else cls.__name__


def _check_conv(conv: nn.Conv2d, x: Tensor) -> None:
    if conv.padding_mode != "zeros":
        raise ModellegoError(
            f"contributions support only padding_mode='zeros', but {conv} uses padding_mode={conv.padding_mode!r}"
        )
    if x.dim() != 4:
        raise ModellegoError(
            f"the input of {conv} must be a batch [B, C, H, W] (4-D), got shape {tuple(x.shape)}"
        )
    if x.shape[1] != conv.in_channels:
        raise ModellegoError(
            f"the input of {conv} must have {conv.in_channels} channels, got shape {tuple(x.shape)}"
        )


def _paddings(conv: nn.Conv2d) -> tuple[tuple[int, int], tuple[int, int]]:
    """(lo, hi) zero padding per spatial dim, exactly as torch pads: 'same' puts total//2 before, the rest after."""
    padding = conv.padding
    if padding == "valid":
        return (0, 0), (0, 0)
    if padding == "same":
        pads = []
        for k, d in zip(conv.kernel_size, conv.dilation):
            total = d * (k - 1)
            pads.append((total // 2, total - total // 2))
        return pads[0], pads[1]
    return (padding[0], padding[0]), (padding[1], padding[1])


def _offset_hits(n_in: int, k: int, s: int, d: int, pad: tuple[int, int], like: Tensor, conv: nn.Conv2d) -> Tensor:
    """A[u, h] = 1 iff input index h is read by kernel offset u at some output position (one spatial dim), shape [k, n_in]."""
    n_out = (n_in + pad[0] + pad[1] - d * (k - 1) - 1) // s + 1
    if n_out < 1:
        raise ModellegoError(f"the input of {conv} is too small: a spatial size of {n_in} gives no output positions")
    offsets = torch.arange(k, device=like.device)
    pos = d * offsets[:, None] + s * torch.arange(n_out, device=like.device)[None, :] - pad[0]
    valid = (pos >= 0) & (pos < n_in)
    hits = torch.zeros(k, n_in, dtype=like.dtype, device=like.device)
    rows = offsets[:, None].expand_as(pos)[valid]
    hits[rows, pos[valid]] = 1  # positions of one offset are distinct, so plain assignment counts each once
    return hits


def _window_sums(x: Tensor, conv: nn.Conv2d) -> Tensor:
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    pad_h, pad_w = _paddings(conv)
    _, _, h, w = x.shape
    rows = _offset_hits(h, kh, sh, dh, pad_h, x, conv)  # [kh, H]
    cols = _offset_hits(w, kw, sw, dw, pad_w, x, conv)  # [kw, W]
    by_col = torch.matmul(x, cols.t())  # [B, I, H, kw]: one GEMM over the contiguous last dim
    return torch.matmul(by_col.transpose(-1, -2), rows.t()).transpose(-1, -2)  # [B, I, kh, kw]


def _conv_contributions(conv: nn.Conv2d, x: Tensor, positive: bool) -> Tensor:
    b = x.shape[0]
    g, n_out, n_in = conv.groups, conv.out_channels, conv.in_channels
    og, ig = n_out // g, n_in // g
    k = conv.kernel_size[0] * conv.kernel_size[1]
    sums = _window_sums(x, conv).reshape(b, n_in, k)  # [B, I, K]
    weight = conv.weight.detach().to(dtype=x.dtype, device=x.device)
    # One small GEMM per input channel i: C[:, :, i] = S[:, i, :] @ W[:, i, :]ᵀ over that channel's group.
    w_by_in = weight.reshape(g, og, ig, k).permute(0, 2, 3, 1).reshape(n_in, k, og)  # [I, K, Og]
    per_in = torch.bmm(sums.permute(1, 0, 2), w_by_in)  # [I, B, Og]
    if positive:
        per_in.clamp_(min=0)
    if g == 1:
        return per_in.permute(1, 2, 0)  # [B, O, I], laid out as [I, B, O]
    out = x.new_zeros(n_in, b, n_out)
    blocks = out.view(g, ig, b, g, og).diagonal(dim1=0, dim2=3)  # [Ig, B, Og, g]: the in-group pairs
    blocks.copy_(per_in.view(g, ig, b, og).permute(1, 2, 3, 0))
    return out.permute(1, 2, 0)


def _linear_contributions(linear: nn.Linear, x: Tensor, positive: bool) -> Tensor:
    if x.dim() < 2 or x.shape[-1] != linear.in_features:
        raise ModellegoError(
            f"the input of {linear} must be a batch [B, ..., {linear.in_features}], got shape {tuple(x.shape)}"
        )
    weight = linear.weight.detach().to(dtype=x.dtype, device=x.device)
    if isinstance(linear, TokenLinear) and x.dim() > 2:
        tokens = x.reshape(x.shape[0], -1, x.shape[-1])
        if not positive:  # the signed sum over tokens is the sum first
            return weight.unsqueeze(0) * tokens.sum(dim=1).unsqueeze(1)
        return (weight.clamp(min=0).unsqueeze(0) * tokens.clamp(min=0).sum(dim=1).unsqueeze(1)
                + weight.clamp(max=0).unsqueeze(0) * tokens.clamp(max=0).sum(dim=1).unsqueeze(1))
    summed = x.reshape(x.shape[0], -1, x.shape[-1]).sum(dim=1) if x.dim() > 2 else x  # [B, I]
    out = weight.unsqueeze(0) * summed.unsqueeze(1)  # [B, O, I]
    if positive:
        out.clamp_(min=0)
    return out
