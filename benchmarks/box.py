"""The box on real data: three builds across Fashion-MNIST and digits with `modellego box build` as a user runs it
(the command line, defaults only), each from a cold box (holding just the two source models: every member is
profiled and cut) and again from the warm box (the components are registered: nothing is cut). Reports the
classes asked, the members used, Score1 (accuracy on the asked classes' test images), the members' own accuracy
and the mean Base of the sources on those classes, params/FLOPs, and the wall time of each command, measured in
one run.

    nice -n 10 python benchmarks/box.py [--out-dir runs/box] [--doc docs/results.md]

Sources (reused when present in --out-dir, else copied from $MODELLEGO_SHARED_MODELS/lenet5.safetensors and
runs/calibration/digits-all.safetensors when there, else trained here with the same recipes):
- fashion.safetensors: LeNet-5 on all 10 Fashion-MNIST classes (8 epochs, lr 2e-3, as benchmarks/train_sources.sh);
- digits.safetensors: LeNet-5 on scikit-learn's digits (30 epochs, lr 2e-3, as benchmarks/calibration.py).
Writes a section between `<!-- box:begin -->` and `<!-- box:end -->`.
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

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MODELLEGO_SHARED_MODELS", ROOT / "runs" / "models"))
BEGIN, END = "<!-- box:begin -->", "<!-- box:end -->"
SOURCES = {
    "fashion": (SHARED / "lenet5.safetensors", ["--data", "fashion-mnist", "--epochs", "8"]),
    "digits": (ROOT / "runs" / "calibration" / "digits-all.safetensors", ["--data", "digits", "--epochs", "30"]),
}
BUILDS = [
    "fashion-mnist:Trouser,fashion-mnist:Bag,digits:3",
    "digits:0,digits:1,digits:2,digits:3,digits:4,fashion-mnist:Sandal,fashion-mnist:Sneaker,fashion-mnist:Ankle boot",
    "fashion-mnist:T-shirt/top,fashion-mnist:Pullover,fashion-mnist:Coat,fashion-mnist:Shirt,digits:8,digits:9",
]


def modellego(*arguments: str) -> tuple[subprocess.CompletedProcess, float]:
    """Run the command line as a user does; its wall time."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "modellego", *arguments], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"modellego {' '.join(arguments)} failed:\n{result.stderr}")
    return result, seconds


def source(out_dir: Path, name: str) -> Path:
    path = out_dir / f"{name}.safetensors"
    shared, recipe = SOURCES[name]
    if not path.exists() and shared.exists():
        shutil.copy(shared, path)
    if not path.exists():
        print(f"training {name} ({' '.join(recipe)})", flush=True)
        modellego("train", "--model", "lenet5", *recipe, "--lr", "0.002", "--seed", "0", "--out", str(path))
    return path


def run_build(out_dir: Path, number: int, classes: str, sources: list[Path]) -> dict:
    from modellego import commands

    folder = out_dir / f"build-{number}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    box = str(folder / "box.sqlite")
    modellego("box", "add", *map(str, sources), "--box", box)
    cold, cold_seconds = modellego("box", "build", "--classes", classes, "--out", str(folder / "cold.safetensors"),
                                   "--json", "--box", box)
    warm, warm_seconds = modellego("box", "build", "--classes", classes, "--out", str(folder / "warm.safetensors"),
                                   "--json", "--box", box)
    cold_record, warm_record = json.loads(cold.stdout), json.loads(warm.stdout)
    report = commands.evaluate_file(folder / "cold.safetensors")
    hand, hand_seconds = by_hand(folder / "hand", classes, sources)
    print(f"build {number}: {classes}: Score1 {100 * cold_record['accuracy']:.2f}%, cold {cold_seconds:.1f} s, "
          f"warm {warm_seconds:.1f} s", flush=True)
    return {"classes": classes, "cold": cold_record, "warm": warm_record, "cold_seconds": cold_seconds,
            "warm_seconds": warm_seconds, "base": report.get("base"), "hand": hand, "hand_seconds": hand_seconds}


def by_hand(folder: Path, classes: str, sources: list[Path]) -> tuple[float, float]:
    """The same model by the commands a user would type without the box: per source, `profile --classes` and
    `disassemble --evaluate`, then `assemble` and `eval`; its Score1 and the commands' summed wall time."""
    folder.mkdir()
    seconds, parts = 0.0, []
    for source_path, dataset in zip(sources, ("fashion-mnist", "digits")):
        names = ",".join(item.split(":", 1)[1] for item in classes.split(",") if item.split(":", 1)[0] == dataset)
        profile_path, part = folder / f"{dataset}.profile.safetensors", folder / f"{dataset}.safetensors"
        seconds += modellego("profile", str(source_path), "--classes", names, "--out", str(profile_path))[1]
        seconds += modellego("disassemble", str(source_path), "--profile", str(profile_path), "--classes", names,
                             "--evaluate", "--out", str(part))[1]
        parts.append((classes.index(f"{dataset}:"), part))
    seconds += modellego("assemble", *[str(part) for _, part in sorted(parts)], "--out",
                         str(folder / "model.safetensors"))[1]
    report, eval_seconds = modellego("eval", str(folder / "model.safetensors"), "--json")
    return json.loads(report.stdout)["accuracy"], seconds + eval_seconds


def percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}%"


def markdown(rows: list[dict], seconds: float) -> str:
    lines = [
        BEGIN,
        "Command: `python benchmarks/box.py` (" + f"{seconds:.0f}" + " s on this 2-core CPU, no GPU). Sources: "
        "LeNet-5 (width 1.0) on all 10 Fashion-MNIST classes (8 epochs, lr 2e-3) and LeNet-5 on scikit-learn's "
        "digits (30 epochs, lr 2e-3). Each build is `modellego box build --classes ... --out FILE` with no other "
        "flag, run twice on its own box: *cold* (the box holds only the two source models, so every member is "
        "profiled on its classes, 50 images per class, and cut with the paper's α/β and the re-fit) and *warm* "
        "(the second run: the components the first registered are reused, nothing is cut). Times are the "
        "command's wall time, process start included. Score1: the built model on the real test images of the "
        "asked classes (both data sets); members' own: their accuracy on their own tasks, weighted by classes; "
        "Base: the source models on the same classes, argmax over all of their classes (the unassembled "
        "reference, recorded by `disassemble --evaluate`).",
        "",
        "",
        "*By hand*: the same model from the six commands a user types without the box (per source `profile "
        "--classes` and `disassemble --evaluate`, then `assemble`, `eval`), their wall times summed.",
        "",
        "| classes asked | members (classes each) | calibration | Score1 | by hand | members' own | Base of the "
        "sources | params | FLOPs | cold build | warm build | by hand |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cold = row["cold"]
        members = " + ".join(f"{len(member['classes'])}" for member in cold["members"])
        lines.append(f"| {row['classes'].replace(',', ', ')} | {len(cold['members'])} ({members}) | "
                     f"{cold['calibration'] or '—'} | {percent(cold['accuracy'])} | {percent(row['hand'])} | "
                     f"{percent(cold['expected_accuracy'])} | {percent(row['base'])} | {cold['params']:,} | "
                     f"{cold['flops']:,} | {row['cold_seconds']:.1f} s ({cold['plan']['cuts']} cut) | "
                     f"{row['warm_seconds']:.1f} s ({row['warm']['plan']['cuts']} cut) | {row['hand_seconds']:.1f} s |")
    same = all(abs(row["warm"]["accuracy"] - row["cold"]["accuracy"]) < 1e-9 for row in rows)
    gap = max(abs(row["hand"] - row["cold"]["accuracy"]) for row in rows)
    hand_note = ("The box's builds equal the hand chain's to the image: the same commands with the same defaults."
                 if gap < 1e-9 else f"The box's builds and the hand chain's differ by up to {100 * gap:.2f} points.")
    lines += ["", f"The warm builds give {'the same' if same else 'a different'} Score1 as the cold ones "
              "(the same components, assembled the same way). A warm build saves only the profiling and cutting: "
              "most of a build is the same either way — process start, the `auto` calibration fitting and scoring "
              "every candidate on the members' own training images, and the evaluation on the test images. "
              "Score1 stays below the members' own accuracy where the classes are alike (shirts, coats and "
              "pullovers), as assemblies without training do; against the sources' Base it is "
              + ", ".join(f"{100 * (row['cold']['accuracy'] - row['base']):+.2f}" for row in rows
                          if row["base"] is not None) + " points. " + hand_note, END]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "box")
    parser.add_argument("--doc", type=Path, default=None, help="Write the table into this file's box section.")
    args = parser.parse_args()
    started = time.perf_counter()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    sources = [source(args.out_dir, name) for name in SOURCES]
    rows = [run_build(args.out_dir, number, classes, sources) for number, classes in enumerate(BUILDS, 1)]
    text = markdown(rows, time.perf_counter() - started)
    print(text)
    (args.out_dir / "results.json").write_text(json.dumps(rows, indent=1))
    if args.doc is not None:
        document = args.doc.read_text()
        if BEGIN in document:
            head, rest = document.split(BEGIN)
            document = head + text + rest.split(END, 1)[1]
        else:
            document += "\n" + text + "\n"
        args.doc.write_text(document)


if __name__ == "__main__":
    main()
