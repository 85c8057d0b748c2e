"""Estimated vs measured peak memory of modellego's training and inference loops (issue 15).

    nice -n 10 python benchmarks/memory.py [--out docs/memory.md] [--batch 16]

For every zoo model (at width 0.25, LeNet-5 at 1.0) at 32 and 64 px and two torchvision builders at 64 and 128 px,
one fresh forked child per row (the parent only imports torch and modellego): build the model as `train` does (normalisation included, 4 classes), make a
dataset of 2 batches of random images, ask `modellego.memory` for its estimate, then run the real loop —
`train.train` for one epoch (two Adam steps, DataLoader included) or `evaluate.predict` (two batches, no
gradients) — and measure how much the process's peak resident set (`ru_maxrss`) grew over the resident set
just before the loop (`/proc/self/statm`). The estimate passes when it is within 25% of the measurement or
above it (on the safe side). Widths and batches are small so the whole table takes a few minutes on a shared
2-core machine; a last row runs the issue's case (googlenet, width 0.25, 224 px) at batch 4.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ZOO = [("lenet5", 1.0), ("vgg11", 0.25), ("vgg16", 0.25), ("resnet18", 0.25), ("resnet50", 0.25),
       ("googlenet", 0.25)]
TORCHVISION = [("torchvision:resnet18", 1.0), ("torchvision:mobilenet_v2", 0.5)]
TOLERANCE = 0.25


def _resident() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_one(builder: str, width: float, size: int, batch: int, work: str) -> dict:
    """In this (fresh) process: the estimate and the measured growth of the peak resident set over one loop."""
    import torch
    from torch.utils.data import TensorDataset

    from modellego import memory
    from modellego.core.evaluate import predict
    from modellego.data.spec import InputSpec
    from modellego.models.classifier import classifier
    from modellego.train import train

    torch.manual_seed(0)
    spec = InputSpec(3, (size, size), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    model = classifier(builder, spec, 4, width)
    images = torch.rand(2 * batch, 3, size, size)
    data = TensorDataset(images, torch.arange(2 * batch) % 4)
    training = work == "training"
    started = time.process_time()
    estimate = memory.estimate(model, (3, size, size), batch, work, training=training)
    estimate_seconds = time.process_time() - started
    before, peak_before = _resident(), _peak()
    if training:
        train(model, data, epochs=1, batch_size=batch, progress=False)
    else:
        predict(model, data, batch_size=batch)
    peak_after = _peak()
    return {"builder": builder, "width": width, "size": size, "batch": batch, "work": work,
            "estimate": estimate.peak_bytes, "tensors": estimate.tensor_bytes, "state": estimate.state_bytes,
            "method": estimate.method, "resident_before": before, "peak_before": peak_before,
            "measured": peak_after - before, "estimate_seconds": estimate_seconds}


def run_row(builder: str, width: float, size: int, batch: int, work: str) -> dict:
    """`measure_one` in a forked child (torch already imported by the parent, which has computed nothing, so the
    child starts from the same clean allocator state a fresh process has, without paying the import again)."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read)
        try:
            text = json.dumps(measure_one(builder, width, size, batch, work))
            code = 0
        except BaseException as error:  # noqa: BLE001 - reported by the parent
            text, code = json.dumps({"error": f"{type(error).__name__}: {error}"}), 1
        with os.fdopen(write, "w") as pipe:
            pipe.write(text)
        os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        text = pipe.read()
    os.waitpid(child, 0)
    row = json.loads(text)
    if "error" in row:
        raise SystemExit(f"{builder} {size}px {work} failed: {row['error']}")
    return row


def verdict(row: dict) -> str:
    ratio = row["estimate"] / row["measured"]
    if abs(ratio - 1) <= TOLERANCE:
        return "within 25%"
    return "safe side" if ratio > 1 else "UNDER"


def table(rows: list[dict]) -> str:
    lines = ["| model | width | input | work | batch | estimated MiB | measured MiB | estimate / measured | verdict "
             "| estimate took (CPU s) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| `{row['builder']}` | {row['width']} | {row['size']}×{row['size']} | {row['work']} | "
                     f"{row['batch']} | {row['estimate'] / 2**20:.0f} | {row['measured'] / 2**20:.0f} | "
                     f"{row['estimate'] / row['measured']:.2f} | {verdict(row)} | {row['estimate_seconds']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "memory.md")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(*json.loads(args.one))))
        return
    import torch

    from modellego import memory
    from modellego.core.evaluate import predict  # noqa: F401
    from modellego.data.spec import InputSpec  # noqa: F401 - imported once here, not in every child
    from modellego.models import build
    from modellego.models.classifier import classifier  # noqa: F401
    from modellego.train import train  # noqa: F401

    # Load torch's meta kernels once in the parent (about 2 s of imports, paid once per process and mostly shared
    # with torch.utils.flop_counter, which every command already uses), so "estimate took" is the marginal cost.
    memory._step_peak(build("lenet5", 3, 4, 0.25), (3, 32, 32), 2, training=True, device="meta")

    configs = [(b, w, s) for b, w in ZOO for s in (32, 64)] + [(b, w, s) for b, w in TORCHVISION for s in (64, 128)]
    rows = []
    started = time.perf_counter()
    for builder, width, size in configs:
        for work in ("training", "inference"):
            rows.append(run_row(builder, width, size, args.batch, work))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    for work in ("training", "inference"):
        rows.append(run_row("googlenet", 0.25, 224, 4, work))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    seconds = time.perf_counter() - started
    under = [row for row in rows if verdict(row) == "UNDER"]
    ratios = sorted(row["estimate"] / row["measured"] for row in rows)
    text = f"""# Peak memory: estimated vs measured

Generated by `nice -n 10 python benchmarks/memory.py` (torch {torch.__version__}, {platform.machine()} CPU,
{torch.get_num_threads()} threads, {seconds / 60:.1f} minutes on a shared 2-core machine). One fresh process (a
child forked from a parent that only imported torch and modellego) per row builds the model as `modellego train` does (4 classes), makes two batches of random images, asks
`modellego.memory.estimate` for the loop's peak, then runs the real loop: **training** = `train.train` for one
epoch (two Adam steps through the DataLoader), **inference** = `evaluate.predict` (two batches, no gradients).
*Measured* is how much the process's peak resident set (`ru_maxrss`) grew over its resident set just before the
loop. The estimate traces one step on the `meta` device (exact tensor bytes at the peak, no arithmetic), adds
Adam's moments for training, then multiplies by {memory.OVERHEAD_FACTOR} and adds
{memory.OVERHEAD_BYTES // 2**20} MiB for what malloc and oneDNN keep besides the tensors (the factor and margin
come from this table). Passing: within {TOLERANCE:.0%} of the measurement, or above it (the safe side).
Widths and batch sizes ({args.batch}; 4 for the last two rows, the issue's 224-px GoogLeNet) are kept small so the
table runs in minutes here; the estimate is a straight line in the batch size, so larger batches scale with it.

{len(rows)} rows: {len(rows) - len(under)} pass, {len(under)} under-estimate; estimate / measured from
{ratios[0]:.2f} to {ratios[-1]:.2f} (median {ratios[len(ratios) // 2]:.2f}).

{table(rows)}
"""
    args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
