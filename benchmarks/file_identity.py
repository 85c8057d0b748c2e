"""Byte identity of the files a fixed chain writes, to check that a change which should not change any result
(a refactor) does not: run it on the code before and after, and compare the printed SHA-256 lines.

    python benchmarks/file_identity.py --out-dir runs/identity [--sources lenet5=A.safetensors,vgg16=B,...]
                                       [--skip-demo] [--skip-graph] > hashes.txt

Every step runs the `modellego` command line, so whichever modellego the Python running it imports is the one
checked (PYTHONPATH=<a checkout>/src selects another checkout). The chain:

- `modellego demo` (LeNet-5 on Fashion-MNIST, 4 epochs): every file it writes;
- per source model given with --sources (the benchmark models: LeNet-5, VGG-16 ×0.25, ResNet-18 ×0.25 from
  benchmarks/train_sources.sh): `profile` (50 per class), then the paper's pure component
  (`disassemble --no-reconstruct`) of {T-shirt/top, Trouser} and of {Sandal, Sneaker, Ankle boot};
- a GCN on `sbm` (`train --model gcn`), its profile, and its pure component of classes 3,4,5
  (`--no-reconstruct`; modellego before issue 21 accepted the flag and never re-fitted graph components).

Files are written under --out-dir (which must be empty or absent); one line per file: `sha256  name`.
Threads are fixed at 2 (`OMP_NUM_THREADS`), as same-seed runs are byte-identical only at one thread count.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
from pathlib import Path

TASKS = {"tb": "T-shirt/top,Trouser", "ssb": "Sandal,Sneaker,Ankle boot"}


def run(*args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "modellego", *args], capture_output=True, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="2", COLUMNS="200"))
    if result.returncode != 0:
        raise SystemExit(f"modellego {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()[-800:]}")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--sources", default="", help="name=model.safetensors,... (source models to cut)")
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--skip-graph", action="store_true")
    args = parser.parse_args()
    out = args.out_dir
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty")
    out.mkdir(parents=True, exist_ok=True)
    if not args.skip_demo:
        run("demo", "--out-dir", str(out / "demo"))
    for entry in filter(None, args.sources.split(",")):
        name, model = entry.split("=", 1)
        profile = out / f"{name}.profile.safetensors"
        run("profile", model, "--out", str(profile))
        for task, classes in TASKS.items():
            run("disassemble", model, "--profile", str(profile), "--classes", classes, "--no-reconstruct",
                "--out", str(out / f"{name}-{task}-pure.safetensors"))
    if not args.skip_graph:
        model, profile = out / "gcn.safetensors", out / "gcn.profile.safetensors"
        run("train", "--model", "gcn", "--data", "sbm", "--out", str(model))
        run("profile", str(model), "--out", str(profile))
        run("disassemble", str(model), "--profile", str(profile), "--classes", "3,4,5", "--no-reconstruct",
            "--out", str(out / "gcn-345.safetensors"))
    for path in sorted(out.rglob("*")):
        if path.is_file():
            print(f"{digest(path)}  {path.relative_to(out)}")


if __name__ == "__main__":
    main()
