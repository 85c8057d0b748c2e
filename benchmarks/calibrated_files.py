"""Edited calibrated assemblies (issue 25): the hostile pass's cases on real assembled files of every fitted
calibration — a deviation of 0, 1e-45 or negative, a temperature of 1e-300, statistics of 3e38, tap positions out
of range, taps moved to other real layers, overlapping logit slices, a joint head's weights — each read by
`modellego.load` in a fresh Python (address space limited to 2 GB beyond importing torch): the outcome, seconds
and peak RSS. Writes a table between `<!-- calibrated:begin -->` and `<!-- calibrated:end -->` of --doc.

    python benchmarks/calibrated_files.py [--doc docs/safety.md]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

import modellego
from modellego import commands
from modellego.benchmarking.hostile import measure_all_in_subprocess
from modellego.core.gates import CALIBRATIONS
from modellego.core.locate import locate
from modellego.core.profile import profile
from modellego.data import load as load_data
from modellego.data.subsets import select_classes

BEGIN, END = "<!-- calibrated:begin -->", "<!-- calibrated:end -->"
FITTED = [name for name in CALIBRATIONS if name not in ("none", "scale")]


def components(folder: Path) -> list:
    """Two components of a LeNet-5 trained briefly on scikit-learn's digits (the default cut)."""
    train = load_data("digits", "train")
    model, manifest = modellego.train_model("lenet5", train, 8, lr=5e-3, progress=False)
    class_profile = profile(model, train, samples_per_class=20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [commands.component(modellego.Brick(model, manifest), locate(model, class_profile), task,
                                   reconstruct_samples=select_classes(train, task))
                for task in ("0,3", "5,7,9")]


def edits(record: dict, tensors: dict) -> list[tuple[str, dict, dict]]:
    """(case, tensors, record) for every reported kind of edit that applies to this file."""
    cases = []

    def tensor_case(name: str, what: str, value) -> None:
        cases.append((f"{name} = {what}", {**tensors, name: value}, record))

    for name, value in tensors.items():
        if not name.startswith(("gate.", "head.")):
            continue
        if name.endswith("_std"):
            tensor_case(name, "0", torch.zeros_like(value))
            tensor_case(name, "1e-45", torch.full_like(value, 1e-45))
            tensor_case(name, "−its value", -value)
        elif value.is_floating_point() and name.endswith(("_mean", "precision", "bank", "profile0", "weight")):
            tensor_case(name, "3e38", torch.full_like(value, 3e38))
        elif not value.is_floating_point():
            tensor_case(name, "1,000,000 (a position)", torch.full_like(value, 10**6))
    architecture = record["architecture"]
    if "gate" in architecture:
        for label, change in (("temperature = 1e-300", lambda g: g.__setitem__("temperature", 1e-300)),
                              ("component 1 reads logits from 0 (overlapping)",
                               lambda g: g["components"][1].__setitem__("start", 0)),
                              ("features tap moved to the first conv",
                               lambda g: g["components"][0]["features"].__setitem__(
                                   "layer", g["components"][0]["features"]["layer"].rsplit("classifier", 1)[0]
                                   + "features.0"))):
            edited = json.loads(json.dumps(record))
            change(edited["architecture"]["gate"])
            cases.append((label, tensors, edited))
        if architecture["gate"]["method"] == "pattern":
            edited = json.loads(json.dumps(record))
            taps = edited["architecture"]["gate"]["components"][0]["pattern"]
            taps[0]["layer"] = taps[-1]["layer"]
            cases.append(("a pattern tap pointing at another real layer", tensors, edited))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--doc", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp)
        first, second = components(folder)
        plans = []
        for calibration in FITTED:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                built = commands.assembly([first, second], "padded", calibration=calibration, store_training_data=True)
            path = folder / f"{calibration}.safetensors"
            modellego.save(built.model, path, built.manifest)
            tensors = {k: v.contiguous() for k, v in modellego.load(path).model.state_dict().items()}
            record = json.loads(modellego.read_manifest(path).to_json())
            for case, case_tensors, case_record in edits(record, tensors):
                edited = folder / f"{calibration}-{len(plans)}.safetensors"
                save_file(case_tensors, str(edited), metadata={"modellego": json.dumps(case_record)})
                plans.append((calibration, case, edited))
        measured = measure_all_in_subprocess([("load", path) for _, _, path in plans], timeout=1800)
        for (calibration, case, _), result in zip(plans, measured):
            outcome = result["outcome"]
            shown = "refused: " + outcome.split("(", 1)[-1].rstrip(")")[:110] if outcome.startswith("refused") else outcome
            rows.append((calibration, case, shown, result["seconds"], result["peak_rss_mb"]))
    refused = sum(row[2].startswith("refused") for row in rows)
    lines = [BEGIN, "## Edited calibrated assemblies (issue 25)", "",
             "`python benchmarks/calibrated_files.py --doc docs/safety.md`: two components of a LeNet-5 trained on "
             "scikit-learn's digits, assembled (padded) with every fitted calibration; each case edits the saved file "
             "and reads it with `modellego.load` in a fresh Python (address space limited to 2 GB beyond importing "
             "torch). Peak RSS includes importing torch. Every edit that loads gives finite outputs on ordinary "
             "images (tests/io/test_calibrated_files.py fuzzes this with hypothesis).", "",
             (f"All {len(rows)} edited files refused at load." if refused == len(rows) else
              f"{refused} of {len(rows)} edited files refused at load; the rest load and are harmless."), "",
             "| calibration | edit | outcome | seconds | peak RSS (MB) |", "|---|---|---|---:|---:|"]
    for calibration, case, shown, seconds, peak in rows:
        lines.append(f"| {calibration} | {case} | {shown.replace('|', '/')} | "
                     f"{'—' if seconds is None else f'{seconds:.3f}'} | {'—' if peak is None else f'{peak:.0f}'} |")
    lines.append(END)
    section = "\n".join(lines) + "\n"
    print(section)
    if args.doc:
        text = args.doc.read_text()
        if BEGIN in text and END in text:
            text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END) + 1:]
        else:
            text = text.rstrip("\n") + "\n\n" + section
        args.doc.write_text(text)


if __name__ == "__main__":
    main()
