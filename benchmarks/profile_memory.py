"""Peak memory of `modellego profile` as the data grows: a full-width CIFAR-style VGG-16 profiled on a generated
ImageFolder of 1×, 4× and 16× the images, each run in a fresh process (peak RSS from the kernel's accounting).

    python benchmarks/profile_memory.py [--base 320] [--factors 1,4,16] [--out-dir runs/profile-memory]
                                        [--doc docs/scaling.md]

Selection and profiling stream the data (a forward pass over every image, only the most confident candidates
kept), so the peak should not grow with the number of images. Prints one line per size and the ratio of each
peak to the 1× peak; rewrites the table between the `memory:begin`/`memory:end` markers of the doc.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = 10
SIZE = 32


def generate(folder: Path, per_class: int, split: str, seed: int) -> None:
    """`per_class` 32×32 RGB PNGs per class: a class colour and a class stripe direction, under noise."""
    rng = np.random.default_rng(seed)
    palette = np.random.default_rng(0).uniform(40, 215, size=(CLASSES, 3))
    for label in range(CLASSES):
        target = folder / split / f"class{label}"
        target.mkdir(parents=True, exist_ok=True)
        stripes = np.indices((SIZE, SIZE))[label % 2] // (2 + label // 2) % 2
        for index in range(per_class):
            noise = rng.normal(0, 40, size=(SIZE, SIZE, 3))
            image = palette[label] + 30 * stripes[..., None] + noise
            Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(target / f"{index:05d}.png")


def dataset(root: Path, per_class: int, seed: int) -> Path:
    """A generated ImageFolder (train/ and test/), reused when it is already there."""
    done = root / "complete"
    if not done.exists():
        generate(root, per_class, "train", seed)
        generate(root, max(4, per_class // 8), "test", seed + 1)
        done.write_text("ok\n")
    return root


def measured(command: list[str]) -> tuple[float, float]:
    """Run `command` in a fresh process; (peak RSS in MiB, seconds). Raises when it fails."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, PYTHONWARNINGS="ignore"))
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    stdout, stderr = process.stdout.read(), process.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{stdout}\n{stderr}")
    return usage.ru_maxrss / 1024, seconds


def modellego(*args: str) -> list[str]:
    return [sys.executable, "-m", "modellego", *args]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=int, default=320, help="training images at 1× (a multiple of 10)")
    parser.add_argument("--factors", default="1,4,16")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--samples-per-class", type=int, default=10)
    parser.add_argument("--out-dir", type=Path, default=Path("runs/profile-memory"))
    parser.add_argument("--doc", type=Path, default=Path("docs/scaling.md"))
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()
    factors = [int(factor) for factor in args.factors.split(",")]
    per_class = args.base // CLASSES
    args.out_dir.mkdir(parents=True, exist_ok=True)

    roots = {factor: dataset(args.out_dir / f"images-{factor}x", per_class * factor, seed=factor) for factor in factors}
    model = args.out_dir / "vgg16.safetensors"
    if not model.exists():
        print(f"training a full-width VGG-16 on the {factors[0]}× images ({args.epochs} epochs)", flush=True)
        peak, seconds = measured(modellego("train", "--model", "vgg16", "--data", "imagefolder", "--data-root",
                                           str(roots[factors[0]]), "--image-size", str(SIZE), "--epochs",
                                           str(args.epochs), "--lr", "0.002", "--batch-size", "32",
                                           "--out", str(model)))
        print(f"  trained in {seconds:.0f} s, peak RSS {peak:.0f} MiB", flush=True)

    rows = []
    for factor in factors:
        images = per_class * factor * CLASSES
        out = args.out_dir / f"profile-{factor}x.safetensors"
        peak, seconds = measured(modellego("profile", str(model), "--data", "imagefolder", "--data-root",
                                           str(roots[factor]), "--image-size", str(SIZE), "--samples-per-class",
                                           str(args.samples_per_class), "--out", str(out)))
        rows.append((factor, images, peak, seconds))
        print(f"{factor:>3}× {images:>6} images: peak RSS {peak:7.1f} MiB ({peak / rows[0][2]:.3f}× the "
              f"{factors[0]}× peak), {seconds:.0f} s", flush=True)

    spread = max(row[2] for row in rows) / min(row[2] for row in rows) - 1
    print(f"largest / smallest peak: {1 + spread:.3f} ({100 * spread:.1f}% apart)")
    if not args.no_doc:
        write_doc(args.doc, rows, args, spread)


def write_doc(path: Path, rows: list[tuple], args: argparse.Namespace, spread: float) -> None:
    lines = [
        "| Images | × | Peak RSS (MiB) | vs 1× | Wall time (s) |",
        "|---:|---:|---:|---:|---:|",
        *[f"| {images:,} | {factor} | {peak:.1f} | {peak / rows[0][2]:.3f} | {seconds:.0f} |"
          for factor, images, peak, seconds in rows],
        "",
        f"Largest peak / smallest: **{1 + spread:.3f}** ({100 * spread:.1f}% apart). Model: the zoo's CIFAR-style "
        f"VGG-16 with BatchNorm at **full width** (64…512 channels), trained {args.epochs} epochs on the 1× images. "
        f"Data: a generated ImageFolder of {SIZE}×{SIZE} RGB PNGs, {CLASSES} classes (class colour and stripes "
        f"under noise), read from disk on demand. Command: `modellego profile MODEL --data imagefolder "
        f"--data-root DIR --image-size {SIZE} --samples-per-class {args.samples_per_class}`, batch 64, one fresh "
        f"process per size; peak RSS is the kernel's `ru_maxrss` of that process. Machine: {platform.machine()}, "
        f"{os.cpu_count()} CPU cores, shared with other jobs.",
    ]
    text = path.read_text() if path.exists() else ""
    begin, end = "<!-- memory:begin -->", "<!-- memory:end -->"
    block = f"{begin}\n\n" + "\n".join(lines) + f"\n\n{end}"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + ("\n\n" if text else "") + block + "\n"
    path.write_text(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
