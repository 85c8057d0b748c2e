"""Throughput of modellego's passes as ratios to a plain forward pass, and what bf16 scoring changes (issue 23).

    nice -n 10 python benchmarks/throughput.py [--doc docs/throughput.md] [--device cpu|cuda|auto] [--quick]

Part 1 — throughput, in one run per device and precision: a plain forward pass (no gradients, batch 64, the
images read through a DataLoader as `modellego eval` reads them),
the profile's selection pass (`select_samples`: forward, softmax, the most confident correct samples, 1 in 32
of a class's images as a profile takes 50 of Fashion-MNIST's 6000; below fp32 with the fp32 re-scoring of the
shortlist, twice as many), the
profile pass (`class_records`: every Conv2d/Linear layer's C⁺ summed per class in float64) and `disassemble`
(the cut by torch-pruning and the closed-form re-fit, layer by layer, on the task's profile samples), each in
images per second and as a multiple of the forward pass's time per image (lower is better: 1× = as fast as a
forward pass). Models: the zoo's VGG-16 and ResNet-18 at width 0.25 on 3×32×32 and torchvision's ResNet-50 at
3×224×224, random weights (throughput does not depend on the weights), random images labelled by the model's
own argmax (so every image is "correct" and all are chosen). Each figure is the best of `--repeats` runs.
At bf16 only the forward and selection passes change: contributions and re-fits stay float32/float64.

Part 2 — what bf16 changes, on models trained on a Fashion-MNIST slice (LeNet-5, VGG-16 ×0.25, ResNet-18
×0.25; 300 images per class, 2 epochs; digits when Fashion-MNIST is absent): the share of the chosen profile
samples (50 per class) that bf16 selection keeps, how many mask entries of the paper-α/β component of two
classes differ when the profile is computed from the bf16 selection, and whether `disassemble --auto` on
those two classes chooses the same α/β and the same component at bf16 as at fp32.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch
from torch.utils.data import Dataset

from modellego import commands, runtime
from modellego.benchmarking.timing import timed
from modellego.commands.demo import demo_dataset
from modellego.core.cut import disassemble
from modellego.core.locate import PAPER, locate
from modellego.core.profile import class_records, from_records, plan_profile, select_samples, selection_batch_size
from modellego.data.spec import InputSpec
from modellego.io.modelfile import load
from modellego.io.profiles import load_profile
from modellego.models.classifier import classifier

MODELS = [("vgg16", 0.25, 32, 256), ("resnet18", 0.25, 32, 256), ("torchvision:resnet50", 1.0, 224, 32)]
TRAINED = [("lenet5", 1.0), ("vgg16", 0.25), ("resnet18", 0.25)]
BATCH = 64


class Labelled(Dataset):
    """Images in memory with labels, class names and targets (what the method's data carries)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: int) -> None:
        self.images, self.targets = images, labels
        self.classes = [str(k) for k in range(classes)]
        self.name = "random"

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.targets[index])

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        return list(zip(self.images[indices], self.targets[indices].tolist()))  # one gather, as the datasets do


def _best(run, repeats: int, device: torch.device) -> float:
    """The shortest of `repeats` timed runs of `run()` (after one untimed run), in seconds."""
    run()
    return min(timed(run, device) for _ in range(repeats))


def throughput(builder: str, width: float, size: int, count: int, device: torch.device, precision: str,
               repeats: int) -> dict:
    torch.manual_seed(0)
    spec = InputSpec(3, (size, size), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    model = classifier(builder, spec, 10, width).to(device).eval()
    images = torch.rand(count, 3, size, size)
    with torch.no_grad():
        labels = torch.cat([model(batch.to(device)).argmax(1).cpu() for batch in images.split(BATCH)])
    data = Labelled(images, labels, 10)
    present = labels.unique().tolist()
    with runtime.settings(precision=precision, workers=0):
        def forward() -> None:  # what `predict` does, without keeping the logits
            with torch.no_grad():
                for batch, _ in runtime.loader(data, device, batch_size=BATCH):
                    with runtime.ranking(device):
                        model(batch.to(device))

        def selection() -> None:  # a profile's share: 50 of Fashion-MNIST's 6000 images per class, here 1 in 32
            select_samples(model, data, max(1, count // 32), batch_size=selection_batch_size((3, size, size)),
                           num_classes=10, wanted=present)

        plan = plan_profile(model, data, samples_per_class=count, batch_size=BATCH, classes=present)

        def profile_pass() -> None:
            for _ in class_records(model, data, plan):
                pass

        profile = from_records(plan, class_records(model, data, plan))
        task = present[:2]  # random weights may answer one class only: then a one-class component
        task_images = images[torch.isin(labels, torch.tensor(task))]
        masks = locate(model, profile, PAPER)

        def cut_and_refit() -> None:
            disassemble(model, masks, [str(k) for k in task], images=task_images)

        seconds = {"forward": _best(forward, repeats, device), "selection": _best(selection, repeats, device),
                   "profile": _best(profile_pass, repeats, device)}
        refit = _best(cut_and_refit, max(1, repeats - 1), device)
    per_image = seconds["forward"] / count
    result = {"model": f"{builder} ×{width:g}" if width != 1 else builder, "input": f"3×{size}×{size}",
              "device": str(device), "precision": precision, "images": count,
              "forward_per_s": count / seconds["forward"]}
    for name in ("selection", "profile"):
        result[f"{name}_per_s"] = count / seconds[name]
        result[f"{name}_x"] = seconds[name] / count / per_image
    result["disassemble_images"] = len(task_images)
    result["disassemble_per_s"] = len(task_images) / refit
    result["disassemble_x"] = refit / len(task_images) / per_image
    return result


def _train(folder: Path, builder: str, width: float, dataset: str) -> Path:
    path = folder / f"{builder}.safetensors"
    commands.train(builder, dataset, path, epochs=2, width=width, max_per_class=300, progress=False, device="cpu")
    return path


def agreement(folder: Path, builder: str, width: float, dataset: str) -> dict:
    """What bf16 scoring changes on one trained model (on the CPU, where the checks are reproducible)."""
    path = _train(folder, builder, width, dataset)
    brick = load(path)
    fp32_profile, bf16_profile = folder / f"{builder}.fp32.profile", folder / f"{builder}.bf16.profile"
    commands.profile(path, fp32_profile, progress=False, device="cpu")
    commands.profile(path, bf16_profile, progress=False, device="cpu", precision="bf16")
    fp32, bf16 = load_profile(fp32_profile), load_profile(bf16_profile)
    kept = sum(len(set(fp32.samples[fp32.sample_labels == row].tolist())
                   & set(bf16.samples[bf16.sample_labels == row].tolist())) for row in range(len(fp32.classes)))
    task = brick.manifest.class_names[:2]
    fp32_masks = locate(brick.model, fp32.subset([0, 1]), PAPER)
    bf16_masks = locate(brick.model, bf16.subset([0, 1]), PAPER)
    differing = sum(int((fp32_masks.masks[name] != bf16_masks.masks[name]).sum()) for name in fp32_masks.masks)
    entries = sum(fp32_masks.masks[name].numel() for name in fp32_masks.masks)
    chosen = {}
    for precision in ("fp32", "bf16"):
        out = folder / f"{builder}.auto.{precision}.safetensors"
        result = commands.disassemble(path, fp32_profile, task, out, auto=True, progress=False, device="cpu",
                                      precision=precision)
        chosen[precision] = (result.search.thresholds.as_dict(), load(out).model.state_dict())
    return {"model": f"{builder} ×{width:g}" if width != 1 else builder, "dataset": dataset,
            "samples": len(fp32.samples), "kept": kept, "mask_entries": entries, "mask_differences": differing,
            "auto_fp32": chosen["fp32"][0], "auto_bf16": chosen["bf16"][0],
            "auto_same_thresholds": chosen["fp32"][0] == chosen["bf16"][0],
            "auto_same_weights": chosen["fp32"][1].keys() == chosen["bf16"][1].keys()
            and all(torch.equal(value, chosen["bf16"][1][key]) for key, value in chosen["fp32"][1].items())}


def markdown(rows: list[dict], agreements: list[dict], command: str, measured: str) -> str:
    earlier = (f" (this page rendered from the `--json` output of earlier runs of it on this machine: `{command}`)"
               if command != measured else "")
    lines = ["# Throughput: modellego's passes against a plain forward pass", "",
             f"Measured by `{measured}`{earlier} on {platform.processor() or platform.machine()}, "
             f"{runtime.usable_cores()} cores usable, torch {torch.__version__}; "
             + ("a CUDA GPU: " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU") + ".",
             "Random weights and images (throughput does not depend on them), batch 64; each figure is the best of "
             "its repeats. A pass's multiple is its time per image over the forward pass's time per image at the "
             "same precision (1× = as fast as a forward pass).", "",
             "| model | input | device | precision | forward (img/s) | selection (img/s, ×) | profile (img/s, ×) "
             "| disassemble + re-fit (img/s, ×) |", "|---|---|---|---|---:|---:|---:|---:|"]
    def rate(value: float) -> str:
        return f"{value:.0f}" if value >= 10 else f"{value:.2g}"

    for row in rows:
        lines.append(f"| {row['model']} | {row['input']} | {row['device']} | {row['precision']} | "
                     f"{rate(row['forward_per_s'])} | {rate(row['selection_per_s'])} ({row['selection_x']:.2f}×) | "
                     f"{rate(row['profile_per_s'])} ({row['profile_x']:.2f}×) | "
                     f"{rate(row['disassemble_per_s'])} ({row['disassemble_x']:.2f}×, {row['disassemble_images']} "
                     "images) |")
    fp32 = [row["profile_x"] for row in rows if row["precision"] == "fp32"]
    if fp32:
        lines += ["", f"At fp32 the profile pass costs {min(fp32):.2f}× to {max(fp32):.2f}× a forward pass over the same "
                  "images. The selection pass reads batches of at most 20 images at 224 px (its memory bound, "
                  "`selection_batch_size`), which on this CPU is faster per image than the forward pass's 64."]
    lines += ["", "At bf16 only the forward and the selection passes run in bf16; the profile pass and the re-fit "
              "are float32/float64 at every precision: their images per second differ from fp32's by noise only, "
              "and their multiples are larger because the bf16 forward pass they are divided by is faster.",
              "`disassemble` includes torch-pruning's dependency graph and cut and the layer-by-layer re-fit (one "
              "pass over the images per re-fitted layer, each adding float64 normal equations), so its cost is "
              "mostly fixed: a multiple of tens of forward passes per image on a few hundred images.", ""]
    if not any(row["device"].startswith("cuda") for row in rows):
        lines += ["No GPU was available for these rows. On a machine with one, `make gpu-check` adds the CUDA rows "
                  "(fp32 and bf16) and checks the chain against the CPU (benchmarks/gpu_check.py).", ""]
    if agreements:
        lines += ["## What bf16 scoring changes", "",
                  "Trained on a slice of the dataset (300 images per class, 2 epochs), profiled with 50 samples per "
                  "class at fp32 and at bf16 (`modellego profile --precision bf16`), both on the CPU.", "",
                  "| model | data | chosen samples bf16 keeps | mask entries that differ (paper α/β, 2 classes) "
                  "| `--auto` α/β fp32 → bf16 | same component weights |", "|---|---|---:|---:|---|---|"]
        for row in agreements:
            auto = ("same: " + ", ".join(f"{k} {v:g}" for k, v in row["auto_fp32"].items() if k in
                                         ("alpha_conv", "beta_conv"))) if row["auto_same_thresholds"] else \
                f"{row['auto_fp32']} → {row['auto_bf16']}"
            lines.append(f"| {row['model']} | {row['dataset']} | {row['kept']}/{row['samples']} "
                         f"({100 * row['kept'] / row['samples']:.1f}%) | {row['mask_differences']}/"
                         f"{row['mask_entries']} | {auto} | {'yes' if row['auto_same_weights'] else 'no'} |")
        lines += ["", "`--auto` scores its candidates at the precision asked for, so the validation accuracies its "
                  "file records are bf16's; the α/β it chooses and the weights it writes are what the table "
                  "compares."]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--doc", type=Path, default=None, help="Write the tables to this markdown page.")
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:N (default cpu).")
    parser.add_argument("--precisions", default="fp32,bf16", help="Comma-separated (default fp32,bf16).")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="Few images, the 32 px models only, no part 2.")
    parser.add_argument("--no-agreement", action="store_true", help="Skip part 2 (training three models).")
    parser.add_argument("--json", type=Path, default=None, help="Also write the rows as JSON.")
    parser.add_argument("--rows-json", type=Path, default=None,
                        help="Take part 1's rows from this earlier --json file instead of measuring them again.")
    parser.add_argument("--agreement-json", type=Path, default=None,
                        help="Take part 2's rows from this earlier --json file instead of measuring them again.")
    args = parser.parse_args()
    device = runtime.resolve_device(args.device)
    rows = json.loads(args.rows_json.read_text())["rows"] if args.rows_json else []
    for builder, width, size, count in [] if args.rows_json else MODELS[:2] if args.quick else MODELS:
        for precision in args.precisions.split(","):
            row = throughput(builder, width, size, 64 if args.quick else count, device, precision,
                             1 if args.quick else args.repeats)
            print(json.dumps(row), flush=True)
            rows.append(row)
    agreements = json.loads(args.agreement_json.read_text())["agreement"] if args.agreement_json else []
    if not (args.quick or args.no_agreement or args.agreement_json):
        dataset = demo_dataset()
        with tempfile.TemporaryDirectory() as folder:
            for builder, width in TRAINED:
                row = agreement(Path(folder), builder, width, dataset)
                print(json.dumps({k: v for k, v in row.items()}), flush=True)
                agreements.append(row)
    command = "python benchmarks/throughput.py " + " ".join(
        part for part in (f"--device {args.device}", "--quick" if args.quick else "",
                          f"--rows-json {args.rows_json}" if args.rows_json else "",
                          f"--agreement-json {args.agreement_json}" if args.agreement_json else "",
                          f"--doc {args.doc}" if args.doc else "") if part)

    measured = "python benchmarks/throughput.py " + " ".join(
        part for part in (f"--device {args.device}", "--quick" if args.quick else "",
                          "--no-agreement" if args.no_agreement else "", f"--doc {args.doc}" if args.doc else "")
        if part)
    page = markdown(rows, agreements, command, measured)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "agreement": agreements}, indent=2))
    if args.doc:
        args.doc.write_text(page)
    print(page)


if __name__ == "__main__":
    main()
