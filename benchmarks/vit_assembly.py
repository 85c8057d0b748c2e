"""A 5+5 assembly of Vision Transformer components, with each calibration: the components for Fashion-MNIST
classes 0–4 and 5–9 cut from the ViT that benchmarks/disassembly.py trains (re-fitted, the default; and the
paper's pure cut), assembled in parallel with every calibration, Score1 on the 10,000 test images against the
source ViT on all 10 classes, measured in one run.

    nice -n 10 python benchmarks/vit_assembly.py [--dir runs/results-vit] [--doc docs/results.md]

Needs DIR/vit-w0.5.safetensors and its profile (`python benchmarks/disassembly.py --models vit --out-dir DIR`).
Writes a section between `<!-- vit-assembly:begin -->` and `<!-- vit-assembly:end -->`.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

from modellego import commands

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- vit-assembly:begin -->", "<!-- vit-assembly:end -->"
HALVES = ("0,1,2,3,4", "5,6,7,8,9")
CALIBRATIONS = ("none", "scale", "msp", "energy", "mahalanobis", "pattern", "joint")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=ROOT / "runs" / "results-vit")
    parser.add_argument("--doc", type=Path, default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    model, profile = args.dir / "vit-w0.5.safetensors", args.dir / "vit-w0.5.profile.safetensors"
    source = commands.evaluate_file(model)
    parts: dict[str, list[Path]] = {"reconstructed": [], "pure": []}
    own: dict[str, list[float]] = {"reconstructed": [], "pure": []}
    for label, reconstruct in (("reconstructed", True), ("pure", False)):
        for half in HALVES:
            path = args.dir / f"vit-half-{half[0]}-{label}.safetensors"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                done = commands.disassemble(model, profile, half, path, evaluate=True, reconstruct=reconstruct,
                                            progress=False)
            parts[label].append(path)
            own[label].append(done.metrics["test_accuracy"])
            print(f"{label} component {half}: {100 * done.metrics['test_accuracy']:.2f}% "
                  f"(restricted base {100 * done.metrics['restricted_base']:.2f}%), {done.metrics['flops']:,} FLOPs",
                  flush=True)
    rows = []
    for label, calibrations in (("reconstructed", (*CALIBRATIONS, "auto")), ("pure", ("scale",))):
        for calibration in calibrations:
            out = args.dir / f"vit-5+5-{label}-{calibration}.safetensors"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = commands.assemble(parts[label], out, calibration=calibration, progress=False)
            report = commands.evaluate_file(out)
            rows.append({"components": label, "calibration": calibration, "chosen": result.calibration.value,
                         "score1": report["accuracy"], "params": report["params"], "flops": report["flops"],
                         "bytes": out.stat().st_size})
            print(f"{label} + {calibration}: Score1 {100 * report['accuracy']:.2f}%", flush=True)
    seconds = time.perf_counter() - started
    lines = [BEGIN, "", f"Command: `python benchmarks/vit_assembly.py` ({seconds:.0f} s on this 2-core CPU). Source: "
             f"the ViT ×0.5 above, {100 * source['accuracy']:.2f}% on all 10 classes ({source['params']:,} params, "
             f"{source['flops']:,} FLOPs). Components for classes 0–4 and 5–9 (the paper's α/β; own test accuracy "
             f"re-fitted {100 * own['reconstructed'][0]:.2f}% / {100 * own['reconstructed'][1]:.2f}%, pure "
             f"{100 * own['pure'][0]:.2f}% / {100 * own['pure'][1]:.2f}%), assembled in parallel, no training; "
             "Score1 on the 10,000 test images.", "",
             "| components | calibration | Score1 | params | FLOPs | file |", "|---|---|---|---|---|---|"]
    for row in rows:
        name = row["calibration"] + (f" (chose {row['chosen']})" if row["calibration"] == "auto" else "")
        lines.append(f"| {row['components']} | {name} | {100 * row['score1']:.2f}% | {row['params']:,} | "
                     f"{row['flops']:,} | {row['bytes'] / 1e6:.2f} MB |")
    lines += ["", f"The source ViT on the same images: {100 * source['accuracy']:.2f}%. The paper's pipeline "
              "(pure components, parameter scaling) is the last row.", "", END]
    text = "\n".join(lines)
    print(text)
    (args.dir / "assembly.json").write_text(json.dumps(rows, indent=1))
    if args.doc is not None:
        document = args.doc.read_text()
        head, rest = document.split(BEGIN) if BEGIN in document else (document + "\n", END)
        args.doc.write_text(head + text + rest.split(END, 1)[1])


if __name__ == "__main__":
    main()
