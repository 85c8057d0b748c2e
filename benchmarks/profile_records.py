"""Profiles as per-class records (issue 22), on the three benchmark models (LeNet-5, VGG-16-BN ×0.25, ResNet-18
×0.25, trained on Fashion-MNIST as benchmarks/paper_common.py's SOURCES say): a profile of only a task's classes
against the all-class profile, a profile built by appending against one built at once, and float16 against
float32. Every profile and component is made by the `modellego` command line, as a user makes them.

    python benchmarks/profile_records.py [--out-dir runs/records] [--models lenet5,vgg16-w0.25,resnet18-w0.25]
                                         [--doc docs/profiles.md]

For each model: `profile` all 10 classes (float32, 50 samples per class); `profile --classes` of each task only;
`profile` classes 0–4 then `--append` 5–9; `profile --dtype float16`. Then, for each task, `disassemble` (the
default, re-fitted, and `--no-reconstruct`, the paper's pure method) from the all-class and from the task-only
profile: the components' tensors must be equal. The masks (`modellego.locate`, paper α/β) of each task's classes
from the task-only profile against the all-class one, and from float16 against float32: entries that differ. The
appended profile's records against the at-once profile's: tensors equal, same digest.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

from modellego import load, load_profile, locate
from modellego.io.safetensors import read_raw
from paper_common import SOURCES, source_model

ROOT = Path(__file__).resolve().parents[1]
TASKS = {"tshirt-trouser": "T-shirt/top,Trouser", "dress-sandal": "Dress,Sandal",
         "sandal-sneaker-boot": "Sandal,Sneaker,Ankle boot"}
START = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - START:7.1f}s] {message}", flush=True)


def modellego(*arguments: str) -> None:
    log("modellego " + " ".join(f"'{a}'" if " " in a or "/" in a and not a.startswith(("/", "runs")) else a
                                for a in arguments))
    done = subprocess.run([sys.executable, "-m", "modellego", *arguments], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {done.stderr.strip()[-1500:]}")


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return read_raw(path, "file").tensors("file")


def masks_of(model_path: Path, profile_path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Each layer's masks of the classes `names` (rows in that order), located with the paper's α/β."""
    model, manifest = load(model_path)
    positions = [manifest.class_names.index(name) for name in names]
    masks = locate(model, load_profile(profile_path, positions, names))
    rows = [masks.output_positions(list(range(len(masks.classes)))).index(p) for p in positions]
    return {layer: mask[rows] for layer, mask in masks.masks.items()}


def differing(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Mask entries that differ, and entries in all."""
    return (sum(int((left[name] != right[name]).sum()) for name in left),
            sum(left[name].numel() for name in left))


def check_model(name: str, out_dir: Path) -> dict:
    model_path = source_model(name, out_dir)
    _, manifest = load(model_path)
    profiles = {}
    for label, extra in (("all", []), ("float16", ["--dtype", "float16"])):
        profiles[label] = out_dir / f"{name}-{label}.profile.safetensors"
        if not profiles[label].exists():
            modellego("profile", str(model_path), *extra, "--out", str(profiles[label]))
    appended = out_dir / f"{name}-appended.profile.safetensors"
    appended.unlink(missing_ok=True)
    modellego("profile", str(model_path), "--classes", "0,1,2,3,4", "--out", str(appended))
    modellego("profile", str(model_path), "--classes", "5,6,7,8,9", "--append", str(appended))
    at_once, built = tensors(profiles["all"]), tensors(appended)
    row = {"model": name, "append_equal": at_once.keys() == built.keys() and
           all(torch.equal(at_once[key], built[key]) for key in at_once),
           "append_digest_equal": load_profile(profiles["all"]).digest() == load_profile(appended).digest(),
           "tasks": {}}
    float16_changed = float16_total = 0
    for task, classes in TASKS.items():
        task_names = classes.split(",")
        only = out_dir / f"{name}-{task}.profile.safetensors"
        if not only.exists():
            modellego("profile", str(model_path), "--classes", classes, "--out", str(only))
        result = {"profile_bytes": only.stat().st_size, "all_bytes": profiles["all"].stat().st_size}
        reference = masks_of(model_path, profiles["all"], task_names)
        result["mask_entries_differing"], result["mask_entries"] = differing(masks_of(model_path, only, task_names),
                                                                             reference)
        changed, total = differing(masks_of(model_path, profiles["float16"], task_names), reference)
        result["float16_changed"] = changed
        float16_changed, float16_total = float16_changed + changed, float16_total + total
        for setting, flags in (("reconstruct", []), ("pure", ["--no-reconstruct"])):
            parts = {}
            for source in ("all", "only"):
                parts[source] = out_dir / f"{name}-{task}-{setting}-from-{source}.safetensors"
                profile_path = profiles["all"] if source == "all" else only
                modellego("disassemble", str(model_path), "--profile", str(profile_path), "--classes", classes,
                          *flags, "--out", str(parts[source]))
            first, second = tensors(parts["all"]), tensors(parts["only"])
            result[f"{setting}_equal"] = first.keys() == second.keys() and \
                all(torch.equal(first[key], second[key]) for key in first)
        row["tasks"][task] = result
    row["float16_changed"], row["float16_total"] = float16_changed, float16_total
    row["float16_bytes"], row["float32_bytes"] = profiles["float16"].stat().st_size, profiles["all"].stat().st_size
    return row


def document(rows: list[dict]) -> str:
    lines = ["# Profiles as per-class records", "",
             "Generated by `python benchmarks/profile_records.py` (Fashion-MNIST, the three benchmark models of "
             "docs/results.md: LeNet-5, VGG-16-BN ×0.25, ResNet-18 ×0.25, each trained by the command in "
             "benchmarks/paper_common.py's SOURCES; 50 samples per class; paper α/β). Tasks: "
             + ", ".join(f"{{{classes}}}" for classes in TASKS.values()) + ".", "",
             "## Only the task's classes", "",
             "A profile of only a task's classes (`profile --classes`) against the all-class profile: the task "
             "classes' mask entries that differ, and whether the components `disassemble` cuts from each (re-fitted, "
             "the default; and the paper's pure method) hold equal tensors.", "",
             "| model | task | task-only profile | all-class profile | mask entries differing | re-fitted components "
             "equal | pure components equal |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        for task, result in row["tasks"].items():
            lines.append(f"| {row['model']} | {task} | {result['profile_bytes']:,} B | {result['all_bytes']:,} B | "
                         f"{result['mask_entries_differing']} of {result['mask_entries']:,} | "
                         f"{result['reconstruct_equal']} | {result['pure_equal']} |")
    lines += ["", "## Appending", "",
              "Classes 0–4 profiled, then 5–9 appended (`profile --append`), against all 10 at once.", "",
              "| model | every tensor equal | same digest |", "|---|---|---|"]
    lines += [f"| {row['model']} | {row['append_equal']} | {row['append_digest_equal']} |" for row in rows]
    lines += ["", "## float16", "",
              "`profile --dtype float16` against float32: the file's size, and the task classes' mask entries that "
              "change (summed over the three tasks).", "",
              "| model | float32 file | float16 file | ratio | mask entries changed |", "|---|---|---|---|---|"]
    lines += [f"| {row['model']} | {row['float32_bytes']:,} B | {row['float16_bytes']:,} B | "
              f"{row['float16_bytes'] / row['float32_bytes']:.3f} | {row['float16_changed']} of "
              f"{row['float16_total']:,} ({100 * row['float16_changed'] / row['float16_total']:.3f}%) |"
              for row in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "records")
    parser.add_argument("--models", default=",".join(SOURCES))
    parser.add_argument("--doc", type=Path, help="write the results as markdown here (docs/profiles.md)")
    args = parser.parse_args()
    rows = [check_model(name, args.out_dir) for name in args.models.split(",")]
    text = document(rows)
    print(text)
    if args.doc:
        args.doc.write_text(text)


if __name__ == "__main__":
    main()
