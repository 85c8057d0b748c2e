"""Benchmark `modellego.core.contributions` on a CIFAR-style VGG-16-BN against a literal reference and the forward
pass.

    python benchmarks/contributions.py [--batch 64] [--width 1.0] [--repeats 5] [--device cpu]

For every Conv2d/Linear layer (its input captured with a forward hook) it times
(a) ours: `contributions(layer, x)` (window sums + one small GEMM per input channel),
(b) naive: the definition followed literally — zero-pad, unfold every window, multiply by
    W per (o, i), sum over positions and kernel offsets, clamp — chunked over output
    channels so its largest temporary stays under --naive-chunk-mb,
(c) forward: the plain `layer(x)`.
Targets (printed, never fatal): ours ≥ 20× faster than naive in total, ours ≤ 1.5× forward in total.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modellego.benchmarking.timing import timed
from modellego.core.contributions import contributions

VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
SPEED_TARGET = 20.0  # naive / ours, total
FORWARD_TARGET = 1.5  # ours / forward, total


def vgg16_bn(width: float = 1.0, num_classes: int = 10) -> nn.Sequential:
    """CIFAR VGG-16 with BatchNorm: 13 3×3 convs (padding 1) + BN + ReLU, 5 max-pools, Linear(512·width, classes)."""
    layers: list[nn.Module] = []
    channels = 3
    for item in VGG16:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        out = max(1, round(int(item) * width))
        layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
        channels = out
    layers += [nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


def capture_inputs(model: nn.Module, x: Tensor) -> list[tuple[str, nn.Module, Tensor]]:
    """Run the model once and keep every Conv2d/Linear layer's input (a copy: later ReLUs are in place)."""
    captured: list[tuple[str, nn.Module, Tensor]] = []
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            hook = lambda m, args, name=name: captured.append((name, m, args[0].detach().clone()))  # noqa: E731
            hooks.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return captured


def naive_contributions(layer: nn.Module, x: Tensor, chunk_bytes: int) -> Tensor:
    """C⁺ by the definition: every window of the zero-padded input times W[o,i,u], summed over p and u, clamped."""
    with torch.no_grad():
        if isinstance(layer, nn.Linear):
            xs = x.reshape(x.shape[0], -1, x.shape[-1]).sum(dim=1)
            return (layer.weight[None] * xs[:, None, :]).clamp(min=0)
        kh, kw = layer.kernel_size
        ph, pw = layer.padding  # the benchmark's convs use integer padding
        cols = F.unfold(F.pad(x, (pw, pw, ph, ph)), (kh, kw), dilation=layer.dilation, stride=layer.stride)
        b, n_in, n_out, g = x.shape[0], layer.in_channels, layer.out_channels, layer.groups
        og, ig = n_out // g, n_in // g
        cols = cols.view(b, n_in, kh * kw, -1)  # [B, I, K, P]
        weight = layer.weight.reshape(n_out, ig, kh * kw)
        out = x.new_zeros(b, n_out, n_in)
        per_o = b * ig * cols.shape[2] * cols.shape[3] * x.element_size()  # the [B, 1, Ig, K, P] product
        step = max(1, chunk_bytes // per_o)
        for o0 in range(0, n_out, step):
            o1 = min(n_out, o0 + step)
            gi = o0 // og
            o1 = min(o1, (gi + 1) * og)  # a chunk stays inside one group
            w = weight[o0:o1]  # [o, Ig, K]
            xc = cols[:, gi * ig : (gi + 1) * ig]  # [B, Ig, K, P]
            prod = w[None, :, :, :, None] * xc[:, None]  # [B, o, Ig, K, P]: every term of the double sum
            out[:, o0:o1, gi * ig : (gi + 1) * ig] = prod.sum(dim=(3, 4))
            del prod  # free it before the next chunk's product exists
        return out.clamp(min=0)


def naive_peak_bytes(layer: nn.Module, x: Tensor, chunk_bytes: int) -> int:
    """Analytic bytes of the naive method's big tensors alive at once: the unfolded input plus one chunk's product."""
    if isinstance(layer, nn.Linear):
        return layer.out_features * layer.in_features * x.shape[0] * x.element_size()
    kh, kw = layer.kernel_size
    b, _, h, w = x.shape
    positions = h * w  # stride 1, padding 1, 3×3 in this VGG
    unfolded = b * layer.in_channels * kh * kw * positions * x.element_size()
    per_o = unfolded // layer.groups
    return unfolded + min(max(1, chunk_bytes // per_o), layer.out_channels) * per_o


def ours_peak_bytes(layer: nn.Module, x: Tensor) -> int:
    """Analytic bytes of our big tensors alive at once: the [B, O, I] result (the GEMM output, returned as a view)
    plus the window sums [B, I, kh·kw] and the row-contracted input [B, I, H, kw]."""
    b = x.shape[0]
    if isinstance(layer, nn.Linear):
        return b * layer.out_features * layer.in_features * x.element_size()
    kh, kw = layer.kernel_size
    n_in = layer.in_channels
    result = b * layer.out_channels * n_in
    return (result + b * n_in * kh * kw + b * n_in * x.shape[2] * kw) * x.element_size()


def median_ms(fn: Callable[[], object], repeats: int, warmup: int, device: torch.device) -> float:
    """Median wall time of fn in milliseconds, after warm-up (synchronising on CUDA)."""

    def run() -> float:
        return timed(fn, device) * 1e3

    for _ in range(warmup):
        run()
    return statistics.median(run() for _ in range(repeats))


def setup(args: argparse.Namespace) -> tuple[torch.device, list[tuple[str, nn.Module, Tensor]]]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    # Train-mode BN normalises with batch statistics, keeping activations O(1): with untrained
    # running statistics (eval mode) they shrink layer by layer into denormals, which are slow.
    model = vgg16_bn(args.width).to(device).train()
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    return device, capture_inputs(model, x)


def run_method(method: str, args: argparse.Namespace, layer: nn.Module, x: Tensor) -> object:
    if method == "ours":
        return contributions(layer, x)
    if method == "naive":
        return naive_contributions(layer, x, args.naive_chunk_mb << 20)
    with torch.no_grad():
        return layer(x)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def rss_probe(args: argparse.Namespace) -> None:
    """Child process: the largest growth of resident memory while one method runs on one layer.

    Before each layer the peak-RSS mark is reset (``echo 5 > /proc/self/clear_refs``), so the
    growth VmHWM − VmRSS covers that layer's temporaries and result only.
    """
    _, captured = setup(args)
    worst = 0
    for _, layer, x in captured:
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kib("VmRSS")
        out = run_method(args.rss_probe, args, layer, x)
        worst = max(worst, _status_kib("VmHWM") - before)
        del out
    print(json.dumps({"delta_kib": worst}))


def measured_cpu_peaks(args: argparse.Namespace) -> dict[str, float] | None:
    """Per-method peak RSS growth in MiB (largest over layers), each in a fresh subprocess; None where Linux's
    /proc/self/clear_refs is not available. A fixed mmap threshold makes every large tensor a fresh mapping
    that is unmapped on free, so malloc's cached free memory cannot hide an allocation."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    peaks = {}
    for method in ("ours", "naive", "forward"):
        cmd = [sys.executable, __file__, "--rss-probe", method, "--batch", str(args.batch), "--width", str(args.width),
               "--naive-chunk-mb", str(args.naive_chunk_mb), "--device", "cpu"]
        result = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        peaks[method] = json.loads(result.stdout.strip().splitlines()[-1])["delta_kib"] / 1024
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of ours and forward (median)")
    parser.add_argument("--naive-repeats", type=int, default=1, help="timed runs of the slow naive reference")
    parser.add_argument("--naive-chunk-mb", type=int, default=512, help="cap on the naive method's chunk product")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rss-probe", choices=("ours", "naive", "forward"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_probe:
        rss_probe(args)
        return

    device, captured = setup(args)
    print(f"VGG-16-BN (CIFAR), width {args.width}, batch {args.batch}, device {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"medians: ours/forward over {args.repeats} runs (1 warm-up), naive over {args.naive_repeats} run(s) (no warm-up)")
    header = f"{'layer':<12}{'input shape':>20}{'[O, I]':>12}{'ours ms':>10}{'naive ms':>11}{'fwd ms':>9}{'naive/ours':>12}{'ours/fwd':>10}"
    print(header)
    print("-" * len(header))
    totals = {"ours": 0.0, "naive": 0.0, "forward": 0.0}
    ours_peak = naive_peak = 0
    chunk = args.naive_chunk_mb << 20
    for name, layer, x in captured:
        ours = median_ms(lambda: run_method("ours", args, layer, x), args.repeats, 1, device)
        naive = median_ms(lambda: run_method("naive", args, layer, x), args.naive_repeats, 0, device)
        fwd = median_ms(lambda: run_method("forward", args, layer, x), args.repeats, 1, device)
        torch.testing.assert_close(contributions(layer, x), naive_contributions(layer, x, chunk), rtol=1e-3, atol=1e-2)
        totals["ours"] += ours
        totals["naive"] += naive
        totals["forward"] += fwd
        ours_peak = max(ours_peak, ours_peak_bytes(layer, x))
        naive_peak = max(naive_peak, naive_peak_bytes(layer, x, chunk))
        n_out, n_in = layer.weight.shape[0], layer.weight.shape[1] * getattr(layer, "groups", 1)
        print(f"{name:<12}{str(list(x.shape)):>20}{str([n_out, n_in]):>12}{ours:>10.2f}{naive:>11.1f}{fwd:>9.2f}"
              f"{naive / ours:>11.1f}x{ours / fwd:>9.2f}x")
    print("-" * len(header))
    speedup, vs_forward = totals["naive"] / totals["ours"], totals["ours"] / totals["forward"]
    print(f"{'total':<44}{totals['ours']:>10.2f}{totals['naive']:>11.1f}{totals['forward']:>9.2f}"
          f"{speedup:>11.1f}x{vs_forward:>9.2f}x")
    print("(results of ours and naive checked equal on every layer)")
    print()
    print(f"target naive/ours >= {SPEED_TARGET:g}x: {speedup:.1f}x  {'PASS' if speedup >= SPEED_TARGET else 'FAIL'}")
    print(f"target ours/forward <= {FORWARD_TARGET:g}x: {vs_forward:.2f}x  {'PASS' if vs_forward <= FORWARD_TARGET else 'FAIL'}")
    print()
    mib = 1 << 20
    print("peak memory, analytic (largest over layers of the big tensors alive at once): "
          f"ours {ours_peak / mib:.0f} MiB, naive {naive_peak / mib:.0f} MiB")
    if device.type == "cuda":
        for method in ("ours", "naive", "forward"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            for _, layer, x in captured:
                out = run_method(method, args, layer, x)
                del out
            peak = (torch.cuda.max_memory_allocated(device) - base) / mib
            print(f"peak memory, measured torch.cuda.max_memory_allocated above the captured inputs: {method} {peak:.0f} MiB")
    else:
        peaks = measured_cpu_peaks(args)
        if peaks is None:
            print("peak memory, measured: not available (needs Linux /proc/self/clear_refs)")
        else:
            print("peak memory, measured: largest growth of resident memory (VmHWM - VmRSS) while one layer runs, "
                  "fresh process per method: " + ", ".join(f"{m} {v:.0f} MiB" for m, v in peaks.items()))


if __name__ == "__main__":
    main()
