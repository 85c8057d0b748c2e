"""`--auto` before and after, timed in one run: the old search (every grid point copied, traced, pruned by
torch-pruning and scored, no reconstruction) against today's `search_thresholds` (one trace, cuts by FLOPs,
one masked model, reconstruction in the loop), on the same model, profile, task and validation images.

    python benchmarks/auto_speed.py --model runs/results/vgg16-w0.25.safetensors \\
        --profile runs/results/vgg16-w0.25.profile.safetensors [--classes Dress,Sandal] [--doc docs/results.md]

The model and profile are what `benchmarks/disassembly.py` writes (or any modellego model and its profile).
It prints both times, their ratio, and each chosen component's α/β, validation accuracy, params and FLOPs,
and writes them between `<!-- auto-speed:begin -->` / `<!-- auto-speed:end -->` in --doc (unless --no-doc).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from pathlib import Path

import torch

from modellego import load
from modellego.core.channels import ChannelGraph
from modellego.core.cut import disassemble
from modellego.core.evaluate import count_flops, count_params, predict
from modellego.core.locate import Thresholds, locate
from modellego.core.search import SEARCH_ALPHAS, SEARCH_BETAS, search_thresholds, validation_data
from modellego.data.subsets import resolve_classes
from modellego.data.task import task_data
from modellego.io.profiles import load_profile
from modellego.kinds.cnn import CNN

ROOT = Path(__file__).resolve().parents[1]

BEGIN, END = "<!-- auto-speed:begin -->", "<!-- auto-speed:end -->"


def old_search(model, profile, task, validation, max_drop=1.0):
    """The search as it was before reconstruction: every grid point located, the model copied, traced and pruned
    by torch-pruning, and scored on `validation`; the fewest FLOPs within `max_drop` points wins."""
    logits, labels = predict(model, validation)
    in_task = torch.full((len(profile.classes),), -1, dtype=torch.long)
    in_task[torch.tensor(task)] = torch.arange(len(task))
    labels = in_task[labels]
    restricted = (logits[:, torch.tensor(task)].argmax(1) == labels).float().mean().item()
    target = restricted - max_drop / 100
    shape = tuple(profile.input_shape)
    graph = ChannelGraph(model, shape)
    best = None
    for alpha in SEARCH_ALPHAS:
        for beta in SEARCH_BETAS:
            thresholds = Thresholds(alpha, beta, round(min(1.0, alpha + 0.1), 4), round(min(1.0, beta + 0.1), 4))
            masks = locate(model, profile, thresholds, graph=graph)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                component = disassemble(model, masks, task, shape)
            accuracy = (predict(component, validation)[0].argmax(1) == labels).float().mean().item()
            flops = count_flops(component, shape)
            key = (accuracy < target, flops if accuracy >= target else -accuracy)
            if best is None or key < best[0]:
                best = (key, component, thresholds, accuracy)
    return best[1], best[2], best[3], restricted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--profile", type=Path, required=True)
    parser.add_argument("--classes", default="Dress,Sandal")
    parser.add_argument("--max-drop", type=float, default=1.0)
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()

    load_average = os.getloadavg()[0]  # other jobs on the machine slow both searches alike; the ratio is what counts
    model, manifest = load(args.model)
    profile = load_profile(args.profile)
    task = resolve_classes(profile.classes, args.classes, "the model's classes")
    train = task_data(manifest, "train")
    validation = validation_data(train, task, profile.samples, 0.1, 0)
    images = CNN().reconstruction_samples(train, profile, task)
    shape = tuple(profile.input_shape)
    print(f"{args.model.name}, task {args.classes}: {len(validation)} validation images, {len(images)} "
          f"reconstruction images, {torch.get_num_threads()} threads", flush=True)

    started = time.monotonic()
    old_component, old_thresholds, old_accuracy, restricted = old_search(model, profile, task, validation,
                                                                          args.max_drop)
    old_seconds = time.monotonic() - started
    print(f"old --auto: {old_seconds:.1f} s", flush=True)
    started = time.monotonic()
    new = search_thresholds(model, profile, task, validation, args.max_drop, reconstruct_images=images)
    new_seconds = time.monotonic() - started
    print(f"new --auto: {new_seconds:.1f} s ({len(new.candidates)} of {new.grid} grid points evaluated)", flush=True)

    def describe(component, thresholds, accuracy):
        return {"thresholds": thresholds.as_dict(), "validation_accuracy": accuracy,
                "params": count_params(component), "flops": count_flops(component, shape)}

    result = {"model": args.model.name, "classes": args.classes, "validation_images": len(validation),
              "reconstruction_images": len(images), "validation_restricted_base": restricted,
              "old": {"seconds": old_seconds, **describe(old_component, old_thresholds, old_accuracy)},
              "new": {"seconds": new_seconds, "evaluated": len(new.candidates), "grid": new.grid,
                      **describe(new.component, new.thresholds, new.accuracy)},
              "speedup": old_seconds / new_seconds, "source_flops": count_flops(model, shape),
              "source_params": count_params(model)}
    print(json.dumps(result, indent=2))
    if args.no_doc:
        return
    lines = [BEGIN, "", f"`--auto` before and after on {args.model.name}, task {{{args.classes}}}, one run "
             f"({time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, {os.cpu_count()} CPU cores, load average "
             f"{load_average:.1f} at the start): {len(validation)} held-out training images score each candidate; the new search "
             f"re-fits on the profile's {len(images)} images of the task.", "",
             "| Search | Time (s) | Grid points evaluated | Chosen α_conv / β_conv | Validation % | Params | FLOPs |",
             "|---|---|---|---|---|---|---|"]
    for name, label, evaluated in (("old", "old (copy + trace + prune per point, no reconstruction)", "42 of 42"),
                                   ("new", "new (masked model, cuts by FLOPs, reconstruction)",
                                    f"{len(new.candidates)} of {new.grid}")):
        row = result[name]
        lines.append(f"| {label} | {row['seconds']:.1f} | {evaluated} | {row['thresholds']['alpha_conv']:g} / "
                     f"{row['thresholds']['beta_conv']:g} | {100 * row['validation_accuracy']:.2f} | "
                     f"{row['params']:,} | {row['flops']:,} |")
    lines += ["", f"Speed-up: **{result['speedup']:.1f}×**; the new choice has "
              f"{result['new']['flops'] / result['old']['flops']:.3f}× the old choice's FLOPs "
              f"(validation restricted base {100 * restricted:.2f}%).", "",
              f"_Generated by `python benchmarks/auto_speed.py --model {args.model} --profile {args.profile} "
              f"--classes {args.classes}`._", "", END]
    block = "\n".join(lines)
    text = args.doc.read_text() if args.doc.exists() else "# Results\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text += "\n## `--auto` speed\n\n" + block + "\n"
    args.doc.write_text(text)


if __name__ == "__main__":
    main()
