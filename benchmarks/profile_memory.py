"""Peak memory of `modellego profile` as the data grows: a full-width CIFAR-style VGG-16 profiled on a generated
ImageFolder of 1×, 4× and 16× the images, each run in a fresh process (peak RSS from the kernel's accounting).

    python benchmarks/profile_memory.py [--base 160] [--factors 1,4,16] [--out-dir runs/profile-memory]
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

from PIL import Image

CLASSES = 10
SIZE = 32


def patterns(count: int, generator):
    """`count` smooth random RGB patterns, 32×32, as uint8 (what the PNGs hold)."""
    import torch
    import torch.nn.functional as F

    coarse = torch.rand(count, 3, 8, 8, generator=generator)
    fine = torch.rand(count, 3, SIZE, SIZE, generator=generator)
    return (0.7 * F.interpolate(coarse, size=SIZE, mode="bilinear") + 0.3 * fine).mul(255).round().byte()


def source_model(path: Path) -> None:
    """A full-width CIFAR-style VGG-16 with random weights whose head is standardised on random images, so that
    its predictions spread over all ten classes. Memory does not depend on what the weights learnt, and the
    images are labelled by this model's own predictions, so every class has correctly classified samples."""
    import torch

    from modellego.data.datasets import IMAGENET_MEAN, IMAGENET_STD
    from modellego.data.spec import InputSpec
    from modellego.io.manifest import ClassRef, Manifest
    from modellego.io.modelfile import save
    from modellego.models.classifier import classifier

    torch.manual_seed(0)
    spec = InputSpec(3, (SIZE, SIZE), IMAGENET_MEAN, IMAGENET_STD)
    model = classifier("vgg16", spec, CLASSES, 1.0).eval()
    head = [module for module in model.modules() if isinstance(module, torch.nn.Linear)][-1]
    with torch.no_grad():
        logits = model(patterns(512, torch.Generator().manual_seed(10_000)).float() / 255)
        mean, std = logits.mean(0), logits.std(0)
        head.weight.div_(std[:, None])
        head.bias.sub_(mean).div_(std)
    manifest = Manifest(architecture={"builder": "vgg16", "in_channels": 3, "num_classes": CLASSES, "width": 1.0},
                        classes=[ClassRef(f"class{k}", "imagefolder", k) for k in range(CLASSES)], input=spec)
    save(model, path, manifest)


def generate(model_path: Path, folder: Path, count: int, seed: int) -> None:
    """`count` 32×32 RGB PNGs of smooth random patterns, each filed under the class the model predicts for it."""
    import torch

    from modellego.io.modelfile import load

    model, _ = load(model_path)
    generator = torch.Generator().manual_seed(seed)
    for label in range(CLASSES):
        (folder / "train" / f"class{label}").mkdir(parents=True, exist_ok=True)
    written = 0
    while written < count:
        batch = min(256, count - written)
        pixels = patterns(batch, generator)
        with torch.no_grad():
            labels = model(pixels.float() / 255).argmax(1)
        for image, label in zip(pixels, labels.tolist()):
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(
                folder / "train" / f"class{label}" / f"{written:06d}.png")
            written += 1
    for label in range(CLASSES):  # ImageFolder refuses a class folder without images
        target = folder / "train" / f"class{label}"
        if not any(target.iterdir()):
            raise SystemExit(f"no generated image was predicted as class {label}; use a larger --base")
    (folder / "test").mkdir(exist_ok=True)


def dataset(model_path: Path, root: Path, count: int, seed: int) -> Path:
    """A generated ImageFolder, reused when it is already there."""
    done = root / "complete"
    if not done.exists():
        generate(model_path, root, count, seed)
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
    parser.add_argument("--base", type=int, default=160, help="training images at 1×")
    parser.add_argument("--factors", default="1,4,16")
    parser.add_argument("--samples-per-class", type=int, default=10)
    parser.add_argument("--out-dir", type=Path, default=Path("runs/profile-memory"))
    parser.add_argument("--doc", type=Path, default=Path("docs/scaling.md"))
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()
    factors = [int(factor) for factor in args.factors.split(",")]
    args.out_dir.mkdir(parents=True, exist_ok=True)

    model = args.out_dir / "vgg16-random.safetensors"
    if not model.exists():
        source_model(model)
    roots = {factor: dataset(model, args.out_dir / f"images-{factor}x", args.base * factor, seed=factor)
             for factor in factors}

    rows = []
    for factor in factors:
        images = args.base * factor
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
        f"VGG-16 with BatchNorm at **full width** (64…512 channels, 15 M parameters) with random weights and a "
        f"head standardised so that its predictions spread over the {CLASSES} classes (memory does not depend on "
        f"what weights learnt; training a full-width VGG-16 here takes too long). Data: a generated ImageFolder "
        f"of {SIZE}×{SIZE} RGB PNGs (smooth random patterns), each filed under the class the model predicts, read "
        f"from disk on demand. Command: `modellego profile MODEL --data imagefolder "
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
