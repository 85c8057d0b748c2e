"""The new-user chain on torchvision classifiers, run as a user runs it: the `modellego` command on a real
four-class ImageFolder (Fashion-MNIST's Trouser, Dress, Sneaker and Bag written as 64×64 RGB PNG files, 60 training
and 25 test images per class), for 14 builders: train, profile, disassemble two 2-class components, `eval
--against`, assemble padded and parallel, eval. Prints one row per model and writes docs/torchvision_chain.md.

    python benchmarks/torchvision_chain.py [--epochs 5] [--batch-size 16] [--out-dir runs/tv-chain] [models ...]
    python benchmarks/torchvision_chain.py --update torchvision:vgg11_bn   # rerun one model, replace its row

A refusal (exit 2, one `error:` line) is a clean outcome; a traceback or any other exit code is a failure.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["torchvision:resnet18", "torchvision:vgg11_bn", "torchvision:densenet121", "torchvision:convnext_tiny",
          "torchvision:shufflenet_v2_x0_5", "torchvision:regnet_x_400mf", "torchvision:vit_b_16",
          "torchvision:swin_t", "torchvision:squeezenet1_0", "torchvision:mobilenet_v2",
          "torchvision:mobilenet_v3_small", "torchvision:efficientnet_b0", "torchvision:googlenet", "googlenet"]
CLASSES = {"Trouser": 1, "Dress": 3, "Sneaker": 7, "Bag": 8}


def write_imagefolder(root: Path, train_per_class: int = 60, test_per_class: int = 25) -> None:
    """Real images in the layout users keep: ROOT/{train,test}/<class>/*.png."""
    from PIL import Image

    from modellego import data

    for split, count in (("train", train_per_class), ("test", test_per_class)):
        source = data.load("fashion-mnist", split)
        for name, label in CLASSES.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            positions = (source.targets == label).nonzero().flatten()[:count]
            for position in positions.tolist():
                pixels = source.images[position, 0].numpy()
                Image.fromarray(pixels).convert("RGB").resize((64, 64)).save(folder / f"{position}.png")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modellego", *args], capture_output=True, text=True,
                          env=dict(os.environ, COLUMNS="200"))


def outcome(result: subprocess.CompletedProcess) -> str:
    if result.returncode == 0:
        return "ok"
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    clean = result.returncode == 2 and len([line for line in lines if line.startswith("error:")]) == 1 and \
        "Traceback" not in result.stderr
    return ("refused: " if clean else f"FAILED (exit {result.returncode}): ") + (lines[-1] if lines else "")


def chain(model: str, folder: Path, out: Path, epochs: int, batch_size: int) -> dict:
    stem = model.replace("torchvision:", "tv-")
    files = {key: out / f"{stem}-{key}.safetensors" for key in ("model", "profile", "tb", "sb", "padded", "parallel")}
    row: dict = {"model": model}
    steps = [
        ("train", ["train", "--model", model, "--data", "imagefolder", "--data-root", str(folder), "--image-size", "64",
                   "--epochs", str(epochs), "--batch-size", str(batch_size), "--out", str(files["model"])]),
        ("eval", ["eval", str(files["model"]), "--json"]),
        ("profile", ["profile", str(files["model"]), "--samples-per-class", "20", "--out", str(files["profile"])]),
        ("disassemble", ["disassemble", str(files["model"]), "--profile", str(files["profile"]), "--classes",
                         "Trouser,Dress", "--out", str(files["tb"])]),
        ("disassemble 2", ["disassemble", str(files["model"]), "--profile", str(files["profile"]), "--classes",
                           "Sneaker,Bag", "--out", str(files["sb"])]),
        ("eval --against", ["eval", str(files["tb"]), "--against", str(files["model"]), "--json"]),
        ("assemble padded", ["assemble", str(files["tb"]), str(files["sb"]), "--out", str(files["padded"])]),
        ("assemble parallel", ["assemble", str(files["tb"]), str(files["sb"]), "--mode", "parallel",
                               "--out", str(files["parallel"])]),
        ("eval padded", ["eval", str(files["padded"]), "--json"]),
        ("eval parallel", ["eval", str(files["parallel"]), "--json"]),
    ]
    import json

    for name, args in steps:
        if name == "eval padded" and not files["padded"].exists():
            continue  # padded mode was refused (e.g. LayerNorm): the parallel assembly is still evaluated
        result = run(*args)
        row[name] = outcome(result)
        warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
        if warnings:
            row.setdefault("warnings", []).extend(f"{name}: {line}" for line in warnings)
        if result.returncode == 0 and "--json" in args:
            row[f"{name} json"] = json.loads(result.stdout)
        if result.returncode != 0 and name != "assemble padded":
            break
    if files["padded"].exists() and files["parallel"].exists():
        row["padded vs parallel"] = logit_error(files["padded"], files["parallel"], folder)
    return row


def logit_error(padded_path: Path, parallel_path: Path, folder: Path) -> float:
    """Largest |padded − parallel| logit over the test images, relative to the largest parallel logit."""
    import torch

    import modellego
    from modellego import data

    padded, manifest = modellego.load(padded_path)
    parallel, _ = modellego.load(parallel_path)
    images = torch.stack([image for image, _ in data.load("imagefolder", "test", folder,
                                                          image_size=manifest.input.size[0])])
    with torch.no_grad():
        expected = parallel(images)
        return ((padded(images) - expected).abs().max() / expected.abs().max()).item()


def summary(row: dict) -> tuple[str, str, str, str, str]:
    def accuracy(key: str, field: str = "accuracy") -> str:
        value = row.get(f"{key} json", {}).get(field)
        return f"{100 * value:.1f}%" if value is not None else "–"

    failed = [f"{step}: {text}" for step, text in row.items()
              if isinstance(text, str) and step != "model" and text != "ok"]
    component = (f"{accuracy('eval --against')} (restricted base {accuracy('eval --against', 'restricted_base')})"
                 if "eval --against json" in row else "–")
    assembled = f"padded {accuracy('eval padded')}, parallel {accuracy('eval parallel')}"
    if "padded vs parallel" in row:
        assembled += f" (logits differ by {row['padded vs parallel']:.1e} relative)"
    return (row["model"], accuracy("eval"), component, assembled, "; ".join(failed) or "every step ok")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=MODELS)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "tv-chain")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "torchvision_chain.md")
    parser.add_argument("--update", action="store_true", help="with some models: replace their rows in --doc")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    folder = args.out_dir / "imagefolder"
    if not (folder / "test").is_dir():
        write_imagefolder(folder)
    rows = []
    for model in args.models:
        started = time.perf_counter()
        row = chain(model, folder, args.out_dir, args.epochs, args.batch_size)
        row["seconds"] = time.perf_counter() - started
        rows.append(row)
        print(" | ".join(summary(row)), f"| {row['seconds']:.0f} s", flush=True)
        for line in row.get("warnings", []):
            print("    " + line, flush=True)
    lines = ["# The new-user chain on torchvision classifiers", "",
             f"`python benchmarks/torchvision_chain.py --epochs {args.epochs} --batch-size {args.batch_size}`: the "
             "`modellego` command on a four-class ImageFolder of real Fashion-MNIST images (Trouser, Dress, Sneaker, "
             "Bag; 60 training and 25 test images per class, 64×64 RGB), CPU. Chance is 25% for the 4-class model, "
             "50% for a 2-class component. Components use the paper's α/β (no `--auto`); assemblies are scaled.", "",
             "| model | trained (test) | component Trouser,Dress (test) | assembly (test) | outcome |",
             "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(summary(row)) + " |" for row in rows]
    warned = [f"- `{row['model']}` {line}" for row in rows for line in row.get("warnings", [])]
    if warned:
        lines += ["", "Warnings the commands printed:", "", *warned]
    if args.models == MODELS:
        args.doc.write_text("\n".join(lines) + "\n")
    elif args.update and args.doc.exists():  # rerun some models: replace their rows and warnings in the page
        text = args.doc.read_text().splitlines()
        for row in rows:
            fresh = "| " + " | ".join(summary(row)) + " |"
            text = [fresh if line.startswith(f"| {row['model']} |") else line for line in text]
            text = [line for line in text if not line.startswith(f"- `{row['model']}` ")]
            text += [f"- `{row['model']}` {line}" for line in row.get("warnings", [])]
        args.doc.write_text("\n".join(text) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
