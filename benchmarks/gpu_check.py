"""The GPU check (issue 23): the method's chain on a device gives files that mean what the CPU's do.

    python benchmarks/gpu_check.py [--device cuda] [--out-dir runs/gpu-check] [--data fashion-mnist|digits]
    make gpu-check        # this, then benchmarks/throughput.py on the same device

One source model is trained on the CPU (LeNet-5, `--epochs`: 3, or 30 on digits; 300 training images per
class), so both chains
start from the same weights. Then the chain runs twice, once with `--device cpu` and once with `--device
DEVICE`: `profile` (50 samples per class), `disassemble` of two tasks (re-fitted, with `--evaluate`), `assemble`
of the two components, `eval` of each file. Checked, each as a line PASS/FAIL:

- the profiles chose the same samples, and their sums agree within 1e-4 relative (float64 sums, summed in
  another order on another device);
- every component's masks (located again from each profile on the CPU's source) are identical, and so are the
  components' layer shapes;
- every accuracy (components, assembly) is within 0.1 point;
- training on the device (the same recipe) ends within 2 points of the CPU's model: kernels differ, so the
  weights cannot be bit-identical, only as good.

With `--device cpu` both chains run on the CPU and must agree exactly: that is how the check's own logic is
tested (tests/test_runtime.py, `test_the_gpu_check_passes_cpu_against_cpu`). Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from modellego import commands, runtime
from modellego.commands.demo import DEMO_TASKS, demo_dataset
from modellego.core.locate import PAPER, locate
from modellego.io.modelfile import load
from modellego.io.profiles import load_profile

TASKS = DEMO_TASKS
SAMPLES_TOLERANCE = 1e-4
ACCURACY_POINTS = 0.1
TRAINING_POINTS = 2.0


def chain(source: Path, dataset: str, folder: Path, device: str, precision: str = "fp32") -> dict:
    """profile → disassemble (two tasks) → assemble → eval on `device`; the files and accuracies."""
    folder.mkdir(parents=True, exist_ok=True)
    run = {"device": device, "precision": precision, "progress": False}
    profile = folder / "source.profile.safetensors"
    commands.profile(source, profile, samples_per_class=50, **run)
    components, accuracies = [], {}
    for number, task in enumerate(TASKS[dataset]):
        path = folder / f"component{number}.safetensors"
        result = commands.disassemble(source, profile, task, path, evaluate=True, **run)
        accuracies[f"component {task}"] = result.metrics["test_accuracy"]
        components.append(path)
    assembly = folder / "assembly.safetensors"
    commands.assemble(components, assembly, **run)
    accuracies["assembly"] = commands.evaluate_file(assembly, **run)["accuracy"]
    return {"profile": profile, "components": components, "assembly": assembly, "accuracies": accuracies}


def compare(source: Path, reference: dict, other: dict, dataset: str) -> list[tuple[str, bool, str]]:
    """The checks of `other` (a chain on the device) against `reference` (the CPU's): (name, passed, detail)."""
    checks = []
    expected, got = load_profile(reference["profile"]), load_profile(other["profile"])
    same_samples = torch.equal(expected.samples, got.samples) and torch.equal(expected.sample_labels, got.sample_labels)
    checks.append(("profile samples identical", same_samples, f"{len(expected.samples)} samples"))
    worst = max(float(((got.contributions[name].double() - expected.contributions[name].double()).abs()
                       / expected.contributions[name].double().abs().clamp(min=1e-3)).max())
                for name in expected.layers)
    checks.append((f"profile sums within {SAMPLES_TOLERANCE:g} relative", worst <= SAMPLES_TOLERANCE,
                   f"largest relative difference {worst:.2e}"))
    model = load(source).model
    for number, task in enumerate(TASKS[dataset]):
        names = [name.strip() for name in task.split(",")]
        rows_expected = [expected.classes.index(name) for name in names]
        rows_got = [got.classes.index(name) for name in names]
        masks_expected = locate(model, expected.subset(rows_expected), PAPER)
        masks_got = locate(model, got.subset(rows_got), PAPER)
        differing = sum(int((masks_expected.masks[layer] != masks_got.masks[layer]).sum())
                        for layer in masks_expected.masks)
        checks.append((f"masks of {task} identical", differing == 0, f"{differing} entries differ"))
        shapes_expected = load(reference["components"][number]).manifest.layers
        shapes_got = load(other["components"][number]).manifest.layers
        checks.append((f"component {task} has the same layer shapes", shapes_expected == shapes_got, ""))
    for name, value in reference["accuracies"].items():
        gap = 100 * abs(other["accuracies"][name] - value)
        checks.append((f"{name} accuracy within {ACCURACY_POINTS} point", gap <= ACCURACY_POINTS,
                       f"{100 * value:.2f}% vs {100 * other['accuracies'][name]:.2f}%"))
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="The device to check against the CPU (default cuda).")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/gpu-check"))
    parser.add_argument("--data", default=None, help="fashion-mnist (default when installed) or digits.")
    parser.add_argument("--epochs", type=int, default=None, help="Training epochs (default 3; 30 on digits).")
    parser.add_argument("--precision", default="fp32", help="The device chain's scoring precision (default fp32).")
    parser.add_argument("--json", type=Path, default=None, help="Also write the checks as JSON.")
    args = parser.parse_args(argv)
    device = runtime.resolve_device(args.device)
    dataset = args.data or demo_dataset()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    source = args.out_dir / "source.safetensors"
    epochs = args.epochs or (30 if dataset == "digits" else 3)
    run = {"epochs": epochs, "max_per_class": 300, "progress": False}
    trained = commands.train("lenet5", dataset, source, device="cpu", **run)
    reference = chain(source, dataset, args.out_dir / "cpu", "cpu")
    other = chain(source, dataset, args.out_dir / str(device).replace(":", "-"), str(device), args.precision)
    checks = compare(source, reference, other, dataset)
    on_device = commands.train("lenet5", dataset, args.out_dir / f"source-{device.type}.safetensors",
                               device=str(device), **run)
    gap = 100 * abs(on_device.metrics["accuracy"] - trained.metrics["accuracy"])
    checks.append((f"training on {device} within {TRAINING_POINTS} points of the CPU", gap <= TRAINING_POINTS,
                   f"{100 * trained.metrics['accuracy']:.2f}% vs {100 * on_device.metrics['accuracy']:.2f}%"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    print(f"# GPU check: LeNet-5 on {dataset}, CPU against {device} ({name}), precision {args.precision}")
    for check, passed, detail in checks:
        print(f"{'PASS' if passed else 'FAIL'}  {check}" + (f"  ({detail})" if detail else ""))
    if args.json:
        args.json.write_text(json.dumps([{"check": c, "passed": p, "detail": d} for c, p, d in checks], indent=2))
    return 0 if all(passed for _, passed, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
