"""BatchNorm re-estimation that does not depend on the batch size (issue 20): the new-user cases that used to
end with classes at 0% in eval mode, run as a user runs them (`modellego train` on a small ImageFolder, then
every class's accuracy on its own training images in eval mode and with batch statistics), and the running
statistics re-estimated at several batch sizes.

    python benchmarks/batchnorm.py [--out-dir runs/batchnorm] [--doc docs/batchnorm.md] [cases ...]

For each case: `modellego train` (which re-estimates the statistics itself), then every class's accuracy on
its own training images in eval mode and with batch statistics (one batch of all of them); then, on the same
trained weights, the statistics re-estimated by modellego's layer-by-layer passes, by the per-batch average it
used before, and by PreciseBN's single pass, each at batch 4, 8, 32 and one batch of all images: the largest
relative difference of any running mean or variance to the one-batch result (denominators below 1e-3 count as
1e-3), the eval-mode accuracy, the classes at 0%, and the time in forward passes of all images.

Cases: densenet121 (torchvision:densenet121, four colours, 64 px, batch 8, 15 epochs), googlenet (the zoo's
GoogLeNet ×0.25, four colours, 32 px, batch 8), regnet (torchvision:regnet_x_400mf, three colours, 64 px,
batch 8). The colour folders are written by this script: solid colours with pixel noise, 24 training and 8 test
images per class.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

COLOURS = {"red": (0.85, 0.1, 0.1), "green": (0.1, 0.75, 0.15), "blue": (0.1, 0.2, 0.85), "yellow": (0.9, 0.85, 0.1)}
CASES = {
    "densenet121": {"model": "torchvision:densenet121", "colours": 4, "size": 64, "epochs": 15, "batch": 8},
    "googlenet": {"model": "googlenet", "width": 0.25, "colours": 4, "size": 32, "epochs": 15, "batch": 8},
    "regnet": {"model": "torchvision:regnet_x_400mf", "colours": 3, "size": 64, "epochs": 15, "batch": 8},
}


def write_colours(root: Path, colours: int, train_per_class: int = 24, test_per_class: int = 8,
                  size: int = 64, seed: int = 0) -> None:
    """ROOT/{train,test}/<colour>/*.png: each image one colour, brightness drawn in ±15%, pixel noise ±0.1."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for name, rgb in list(COLOURS.items())[:colours]:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                brightness = 0.85 + 0.3 * torch.rand(1, generator=generator)
                noise = (torch.rand(size, size, 3, generator=generator) - 0.5) * 0.2
                pixels = (torch.tensor(rgb) * brightness + noise).clamp(0, 1)
                Image.fromarray((pixels * 255).round().byte().numpy()).save(folder / f"{index}.png")


def per_class(model: torch.nn.Module, dataset, batch_statistics: bool = False) -> dict[str, float]:
    """Accuracy per class on `dataset`, in eval mode, or with every BatchNorm using the whole set's statistics
    (one batch of all images, train-mode BatchNorm: the reference the running statistics should reproduce)."""
    images, labels = next(iter(DataLoader(dataset, batch_size=len(dataset))))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
    model.eval()
    if batch_statistics:
        for m in norms:
            m.train()
    with torch.no_grad():
        predicted = model(images).argmax(1)
    for m, (mean, var, tracked) in zip(norms, saved):
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
        m.num_batches_tracked.copy_(tracked)
    model.eval()
    return {name: (predicted[labels == k] == k).float().mean().item() for k, name in enumerate(dataset.classes)}


def run_case(name: str, out_dir: Path) -> dict:
    import modellego
    from modellego import data
    from modellego.core.reconstruct import batchnorm_layers, batchnorm_levels, reestimate_batchnorm

    case = CASES[name]
    folder = out_dir / f"colours{case['colours']}-{case['size']}"
    if not folder.exists():
        write_colours(folder, case["colours"], size=case["size"])
    model_file = out_dir / f"{name}.safetensors"
    command = [sys.executable, "-m", "modellego", "train", "--model", case["model"], "--data", "imagefolder",
               "--data-root", str(folder), "--image-size", str(case["size"]), "--epochs", str(case["epochs"]),
               "--batch-size", str(case["batch"]), "--out", str(model_file)]
    if "width" in case:
        command += ["--width", str(case["width"])]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, COLUMNS="200"))
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{name}: train failed: {result.stderr.strip()[-500:]}")
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    model, manifest = modellego.load(model_file)
    train_data = data.load("imagefolder", "train", folder, image_size=case["size"])
    row = {"case": name, "model": case["model"], "train_seconds": round(seconds, 1), "warnings": warnings,
           "eval_mode": per_class(model, train_data), "batch_statistics": per_class(model, train_data, True),
           "test_accuracy": manifest.metrics["test_accuracy"]}
    images = torch.stack([train_data[i][0] for i in range(len(train_data))])
    started = time.perf_counter()
    with torch.no_grad():
        model(images)
    forward = time.perf_counter() - started
    row["levels"] = len(batchnorm_levels(model, batchnorm_layers(model), images[:1]))
    row["layers"] = len(batchnorm_layers(model))
    # the running statistics re-estimated at several batch sizes, against one batch of all images: modellego's
    # (layer by layer) and the previous one (a cumulative average of per-batch statistics, train-mode BatchNorm)
    for method, function in (("layerwise", reestimate_batchnorm), ("per-batch average", per_batch_average),
                             ("PreciseBN", precise_bn)):
        reference = None
        results = {}
        for batch in (len(train_data), 4, 8, 32):
            started = time.perf_counter()
            function(model, train_data, batch_size=batch)
            elapsed = time.perf_counter() - started
            stats = torch.cat([torch.cat([m.running_mean, m.running_var]) for m in batchnorm_layers(model)])
            if reference is None:
                reference = stats
            accuracy = per_class(model, train_data)
            results[batch] = {
                "seconds": round(elapsed, 2), "seconds_per_forward": round(elapsed / forward, 1),
                "max_relative_difference": ((stats - reference).abs() / reference.abs().clamp(min=1e-3)).max().item(),
                "eval_accuracy": sum(accuracy.values()) / len(accuracy),
                "classes_at_zero": [k for k, v in accuracy.items() if v == 0]}
        row[method] = results
    reestimate_batchnorm(model, train_data)
    return row


@torch.no_grad()
def precise_bn(model: torch.nn.Module, dataset, batch_size: int) -> None:
    """PreciseBN (Wu & Johnson 2021) as a reference: one pass with train-mode BatchNorm, each layer's input sums
    merged over all images (population mean and variance, not a mean of per-batch variances); the layers after
    the first still see inputs normalised by each batch's own statistics."""
    from modellego.core.reconstruct import Moments, batchnorm_layers

    layers = batchnorm_layers(model)
    moments = {layer: Moments(layer.num_features) for layer in layers}  # shift: each one's first batch mean
    handles = [layer.register_forward_pre_hook(lambda m, args: moments[m].add(args[0])) for layer in layers]
    model.eval()
    for layer in layers:
        layer.train()
    for images, _ in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        if len(images) > 1:
            model(images)
    for handle in handles:
        handle.remove()
    for layer in layers:
        layer.running_mean.copy_(moments[layer].mean.float())
        layer.running_var.copy_(moments[layer].variance().float())
    model.eval()


@torch.no_grad()
def per_batch_average(model: torch.nn.Module, dataset, batch_size: int) -> None:
    """The re-estimation modellego had before issue 20, kept as the reference: every BatchNorm in train mode
    with momentum=None (running statistics = the mean over batches of each batch's mean and variance)."""
    from modellego.core.reconstruct import batchnorm_layers

    layers = batchnorm_layers(model)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    model.eval()
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None
        layer.train()
    for images, _ in loader:
        if len(images) > 1:
            model(images)
    for layer in layers:
        layer.momentum = 0.1
    model.eval()


def markdown(rows: list[dict]) -> str:
    """docs/batchnorm.md: the cases, and per case and method the statistics at each batch size."""
    lines = ["# BatchNorm re-estimation that does not depend on the batch size", "",
             "`python benchmarks/batchnorm.py --doc docs/batchnorm.md` (CPU, 2 cores). Four- or three-colour "
             "ImageFolders written by the script (solid colours with pixel noise, 24 training and 8 test images per "
             "class); each model trained by `modellego train` at `--batch-size 8` for 15 epochs. The statistics "
             "are then re-estimated on the same weights, over all training images, by each method at each batch "
             "size: *largest difference* is the largest relative difference of any running mean or variance "
             "to the one-batch result of the same method (denominators below 1e-3 count as 1e-3); *eval "
             "accuracy* is the mean per-class accuracy on the training images in eval mode; *time* is in forward "
             "passes of all the images.", ""]
    for row in rows:
        lines += [f"## {row['model']} ({row['case']}): {row['layers']} BatchNorm layers in {row['levels']} levels", "",
                  f"`modellego train` took {row['train_seconds']} s; test accuracy "
                  f"{100 * row['test_accuracy']:.1f}%. Training images right per class in eval mode: "
                  + ", ".join(f"{k} {100 * v:.0f}%" for k, v in row["eval_mode"].items())
                  + "; with batch statistics (one batch of all): "
                  + ", ".join(f"{k} {100 * v:.0f}%" for k, v in row["batch_statistics"].items())
                  + (f". Warnings: {'; '.join(row['warnings'])}" if row["warnings"] else ". No warning."), "",
                  "| method | batch | largest difference | eval accuracy | classes at 0% | time (forward passes) |",
                  "|---|---|---|---|---|---|"]
        for method in ("layerwise", "PreciseBN", "per-batch average"):
            for batch, result in row[method].items():
                lines.append(f"| {method} | {batch} | {result['max_relative_difference']:.2g} | "
                             f"{100 * result['eval_accuracy']:.1f}% | {', '.join(result['classes_at_zero']) or '–'} | "
                             f"{result['seconds_per_forward']} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", default=list(CASES))
    parser.add_argument("--out-dir", type=Path, default=Path("runs/batchnorm"))
    parser.add_argument("--json", type=Path, default=None, help="Also write the rows as JSON.")
    parser.add_argument("--doc", type=Path, default=None, help="Write the tables to this markdown page.")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.cases:
        row = run_case(name, args.out_dir)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.doc:
        args.doc.write_text(markdown(rows))


if __name__ == "__main__":
    main()
