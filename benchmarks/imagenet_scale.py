"""ImageNet-shaped sources (issue 22): torchvision ResNet-50 and ResNet-18 with 1000 classes, their random
weights written as a `.pth` state dict and brought in with `modellego import`, on 224-px images labelled by the
model's own predictions, 2 per class, in an ImageFolder named with ImageNet's class names. Each command runs as a
user runs it (`modellego ...` in its own process) under a counter of peak resident memory, time, images read
(paths opened by the image loader) and bytes read from / written to the profile.

    python benchmarks/imagenet_scale.py [--out-dir runs/scale] [--doc docs/scale.md] [--keep]

Runs: import ResNet-50; profile 5, 10 and 100 of its classes (float32); refuse its 1000-class profile up front on
a file system too small for it (a 24 GiB /dev/shm, when there is one); disassemble a 2-class component from the
100-class profile; import ResNet-18 and profile all 1000 classes with --dtype float16. `--quick` runs the same
chain with ResNet-18 only, 20 classes, 64 px (a check of the script, minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PER_CLASS = 2  # images per class in the folder
GENERATED = 3  # images per class generated, so that every class is the prediction of at least PER_CLASS

# The measured process: the CLI, with the image loader and safetensors' ranged reader counting what they read.
CHILD = r"""
import json, sys, time
started = time.perf_counter()
def peak_rss():
    # VmHWM: this process's own high-water mark. Not ru_maxrss, which keeps the parent's RSS at the fork.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
import torchvision.datasets.folder as folder
opened = []
_loader = folder.default_loader
def counting_loader(path, *args, **kwargs):
    opened.append(str(path))
    return _loader(path, *args, **kwargs)
folder.default_loader = counting_loader
from modellego.io import safetensors
reads = {}
_close = safetensors.OpenFile.close
def counting_close(self):
    reads[str(self.source)] = reads.get(str(self.source), 0) + self.bytes_read
    _close(self)
safetensors.OpenFile.close = counting_close
from modellego.cli import main
sys.argv = ["modellego", *sys.argv[1:]]
code = 0
try:
    main()
except SystemExit as exit:
    code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 2)
print("MEASURED " + json.dumps({"code": code, "seconds": time.perf_counter() - started,
                                "peak_rss": peak_rss(),
                                "opened": opened, "reads": reads}))
"""


def measure(*arguments: str, writes: Path | None = None) -> dict:
    """Run `modellego ARGUMENTS` in its own process and return what it measured (and the size of `writes`)."""
    done = subprocess.run([sys.executable, "-c", CHILD, *arguments], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    lines = [line for line in done.stdout.splitlines() if line.startswith("MEASURED ")]
    if not lines:
        raise SystemExit(f"modellego {' '.join(arguments)} died: {done.stderr.strip()[-2000:]}")
    row = json.loads(lines[-1][len("MEASURED "):])
    row["stdout"] = "\n".join(line for line in done.stdout.splitlines() if not line.startswith("MEASURED "))
    row["stderr"] = done.stderr.strip()
    row["written"] = writes.stat().st_size if writes is not None and writes.exists() else 0
    print(f"  modellego {' '.join(arguments)}\n    exit {row['code']}, {row['seconds']:.1f} s, peak RSS "
          f"{row['peak_rss'] / 2**30:.2f} GiB, {len(row['opened'])} image reads, {row['written']:,} bytes written"
          + (f"\n    {row['stderr'].splitlines()[-1]}" if row["stderr"] else ""), flush=True)
    return row


def imagenet_names() -> list[str]:
    """ImageNet-1k's class names as torchvision's weight documentation gives them (no download)."""
    import torchvision

    return list(torchvision.models.ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


def prepare(builder: str, folder: Path, classes: int, size: int, seed: int = 0) -> tuple[Path, Path, Path]:
    """A random-weight torchvision `builder` with `classes` outputs, its head pointed so that every class is the
    prediction of at least PER_CLASS of GENERATED × classes random images; writes its state dict (`.pth`), the
    class-names file, and ROOT/train/<class name>/ with the PER_CLASS images it is most confident on."""
    weights, names_file, data = folder / f"{builder}.pth", folder / f"{builder}-classes.txt", folder / f"{builder}-data"
    complete = data / f"complete-{classes}-{size}-{seed}"
    if complete.exists() and weights.exists() and names_file.exists():  # made by an earlier run with these settings
        print(f"  {builder}: reusing {weights} and {data}", flush=True)
        return weights, names_file, data
    import torchvision
    from PIL import Image

    from modellego.benchmarking.selfcheck import _randomise_norms, balance_head, head_inputs
    from modellego.core.modules import Normalize
    from modellego.data.datasets import IMAGENET_MEAN, IMAGENET_STD

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    network = torchvision.models.get_model(builder, weights=None, num_classes=classes).eval()
    model = torch.nn.Sequential(Normalize(IMAGENET_MEAN, IMAGENET_STD), network).eval()
    images = (torch.rand(GENERATED * classes, 3, size, size, generator=generator) * 255).to(torch.uint8)
    _randomise_norms(model, images[:64].float() / 255, generator)
    started = time.perf_counter()
    inputs = torch.cat([head_inputs(model, network.fc, images[start:start + 64].float() / 255)
                        for start in range(0, len(images), 64)])
    labels = balance_head(network.fc, inputs, PER_CLASS, steps=1500)
    confidence = torch.softmax(network.fc(inputs), 1).max(1).values
    print(f"  {builder}: head balanced on {len(images)} images in {time.perf_counter() - started:.0f} s", flush=True)
    torch.save(network.state_dict(), weights)
    names = imagenet_names()[:classes]
    names_file.write_text("\n".join(names) + "\n")
    shutil.rmtree(data, ignore_errors=True)
    for position, name in enumerate(names):
        mine = (labels == position).nonzero().flatten()
        chosen = mine[confidence[mine].argsort(descending=True)[:PER_CLASS]]
        (data / "train" / name).mkdir(parents=True)
        for index in chosen.tolist():
            Image.fromarray(images[index].permute(1, 2, 0).numpy()).save(data / "train" / name / f"{index}.png")
    complete.touch()
    return weights, names_file, data


def class_of(path: str) -> str:
    return Path(path).parent.name


def run(out_dir: Path, quick: bool) -> dict:
    """Every measured step; returns the rows the document is written from."""
    out_dir.mkdir(parents=True, exist_ok=True)
    size, classes = (64, 20) if quick else (224, 1000)
    names = imagenet_names()[:classes]
    results: dict = {"size": size, "classes": classes, "per_class": PER_CLASS, "cores": os.cpu_count(),
                     "torch": torch.__version__, "steps": {}}
    steps = results["steps"]
    plans = [("resnet18", {"all": classes})] if quick else [("resnet50", {"5": 5, "10": 10, "100": 100}),
                                                            ("resnet18", {"all": classes})]
    for builder, profiles in plans:
        print(f"{builder}:", flush=True)
        weights, names_file, data = prepare(builder, out_dir, classes, size)
        model = out_dir / f"{builder}.safetensors"
        model.unlink(missing_ok=True)
        steps[f"{builder} import"] = measure("import", f"torchvision:{builder}", "--weights", str(weights),
                                             "--classes-file", str(names_file), "--image-size", str(size),
                                             "--out", str(model), writes=model)
        largest = None
        for label, count in profiles.items():
            path = out_dir / f"{builder}-{label}.profile.safetensors"
            path.unlink(missing_ok=True)
            asked = names[:count] if label != "all" else names
            dtype = ["--dtype", "float16"] if label == "all" else []
            asked_arguments = [] if label == "all" else ["--classes", ",".join(asked)]
            row = measure("profile", str(model), *asked_arguments, *dtype, "--samples-per-class", str(PER_CLASS),
                          "--data", "imagefolder", "--data-root", str(data), "--out", str(path), writes=path)
            row["asked"] = count
            row["dtype"] = "float16" if dtype else "float32"
            row["foreign_images"] = sum(class_of(opened) not in set(asked) for opened in row["opened"])
            row["distinct_images"] = len(set(row["opened"]))
            steps[f"{builder} profile {label}"] = row
            largest = path
        if builder == "resnet50" or quick:
            component = out_dir / f"{builder}-2class.safetensors"
            component.unlink(missing_ok=True)
            task = ",".join(names[3:5])
            row = measure("disassemble", str(model), "--profile", str(largest), "--classes", task,
                          "--data-root", str(data), "--out", str(component), writes=component)
            row["profile_bytes"] = largest.stat().st_size
            row["profile_read"] = row["reads"].get(str(largest), 0)
            row["foreign_images"] = sum(class_of(opened) not in set(names[3:5]) for opened in row["opened"])
            steps[f"{builder} disassemble 2 classes from {max(profiles.values())}-class profile"] = row
            shm = Path("/dev/shm")
            if shm.is_dir():
                refused = shm / f"{builder}-all.profile.safetensors"
                row = measure("profile", str(model), "--samples-per-class", str(PER_CLASS), "--data", "imagefolder",
                              "--data-root", str(data), "--out", str(refused), writes=refused)
                row["free"] = shutil.disk_usage(shm).free
                row["left_behind"] = refused.exists()
                refused.unlink(missing_ok=True)
                steps[f"{builder} profile all on /dev/shm"] = row
        header = _header(model)
        results.setdefault("sizes", {})[builder] = header
    return results


def _header(model: Path) -> dict:
    """What a profile of every class of `model` takes in each encoding, from its channel pairs."""
    from modellego import load
    from modellego.io.profiles import DTYPES
    from modellego.kinds import kind_of

    network, manifest = load(model)
    pairs = kind_of(manifest).pairs(network)
    return {"pairs": pairs, "classes": len(manifest.classes),
            **{dtype: pairs * DTYPES[dtype][1].itemsize * len(manifest.classes) for dtype in DTYPES}}


def gib(count: float) -> str:
    return f"{count / 2**30:.2f} GiB"


def folder_counts(out_dir: Path) -> dict[str, tuple[int, int]]:
    """Per builder: the classes its image folder holds, and its images (a class predicted for only one of the
    generated images has one)."""
    counts = {}
    for data in sorted(out_dir.glob("*-data")):
        classes = [folder for folder in (data / "train").iterdir() if folder.is_dir()]
        counts[data.name.removesuffix("-data")] = (len(classes), sum(len(list(folder.iterdir())) for folder in classes))
    return counts


def document(results: dict, out_dir: Path) -> str:
    steps = results["steps"]
    counts = folder_counts(out_dir)
    lines = ["# Profiles at ImageNet scale", "",
             "Generated by `python benchmarks/imagenet_scale.py` (torch " + results["torch"] + f", CPU, "
             f"{results['cores']} cores). Sources: torchvision ResNet-50 and ResNet-18 with {results['classes']} "
             "classes and random weights, written as a `.pth` state dict and brought in with `modellego import` "
             "(ImageNet's class names and normalisation). Data: an ImageFolder of "
             f"{results['size']}×{results['size']} random images, {results['per_class']} per class, each labelled "
             "by the model's own prediction (its head pointed so that every class is predicted; as the support "
             "matrix does). Every command runs in its own process as a user runs it; peak RSS is the process's own high-water mark (VmHWM: "
             "Python, torch and the model included), images read are the paths the image loader opened "
             "(the selection pass and the contribution pass each open a class's images), bytes written the "
             "profile file's size. Image folders: "
             + ", ".join(f"{builder} {images:,} images of {classes:,} classes" for builder, (classes, images) in
                         counts.items()) + ".", "",
             "| step | exit | time | peak RSS | images read (distinct) | other classes' images | bytes written |",
             "|---|---|---|---|---|---|---|"]
    for name, row in steps.items():
        distinct = row.get("distinct_images", len(set(row["opened"])))
        lines.append(f"| {name} | {row['code']} | {row['seconds']:.0f} s | {gib(row['peak_rss'])} | "
                     f"{len(row['opened'])} ({distinct}) | {row.get('foreign_images', '—')} | "
                     f"{row['written']:,} |")
    lines += ["", "## What a profile of every class takes", "",
              "| model | channel pairs per class | classes | float32 | float16 |", "|---|---|---|---|---|"]
    for builder, size in results.get("sizes", {}).items():
        lines.append(f"| {builder} | {size['pairs']:,} | {size['classes']} | {gib(size['float32'])} | "
                     f"{gib(size['float16'])} |")
    disassembled = [row for name, row in steps.items() if "disassemble" in name]
    lines += ["", "## Reading"]
    for row in disassembled:
        lines.append(f"- The 2-class component read {row['profile_read']:,} of the profile's {row['profile_bytes']:,} "
                     f"bytes ({100 * row['profile_read'] / row['profile_bytes']:.2f}%): the header and the task's two "
                     "records, never the whole file.")
    flat = [(name, row) for name, row in steps.items() if name.startswith("resnet50 profile") and row["code"] == 0]
    if len(flat) > 1:
        first, last = flat[-2][1], flat[-1][1]
        lines.append("- Peak RSS by classes profiled (ResNet-50): " + ", ".join(
            f"{row['asked']}: {gib(row['peak_rss'])}" for _, row in flat) + f"; from {first['asked']} to "
            f"{last['asked']} classes {100 * (last['peak_rss'] / first['peak_rss'] - 1):+.1f}%: memory holds one "
            "batch and one class's sums, whatever the number of classes. Only the asked classes' images are read.")
    for name, row in steps.items():
        if name.endswith("on /dev/shm"):
            lines.append(f"- `{name}`: exit {row['code']} after {row['seconds']:.1f} s, nothing left behind: "
                         f"{not row['left_behind']}. {row['stderr'].splitlines()[-1] if row['stderr'] else ''}")
    lines.append("- Times are wall-clock seconds on a 2-core machine that ran other benchmarks at the same time: "
                 "they are noisy. Memory, images read and bytes are what this page measures.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "scale")
    parser.add_argument("--doc", type=Path, help="write the results as markdown here (docs/scale.md)")
    parser.add_argument("--json", type=Path, help="write the measured rows as JSON here")
    parser.add_argument("--quick", action="store_true", help="ResNet-18 only, 20 classes, 64 px: a check of the script")
    parser.add_argument("--keep", action="store_true", help="keep the profiles and images (gigabytes)")
    parser.add_argument("--from-json", type=Path, help="write the document from rows an earlier run saved (--json)")
    args = parser.parse_args()
    if args.from_json:
        results = json.loads(args.from_json.read_text())
    else:
        results = run(args.out_dir, args.quick)
    if args.json and not args.from_json:
        args.json.write_text(json.dumps(results, indent=1))
    text = document(results, args.out_dir)
    print(text)
    if args.doc:
        args.doc.write_text(text)
    if not args.keep and not args.from_json:
        for path in args.out_dir.glob("*.profile.safetensors"):
            path.unlink()


if __name__ == "__main__":
    main()
