"""Which tokens a Transformer block's contributions sum over (docs/method.md, "Contribution over tokens"): all
tokens (the default), the class token in the last block only (the only token of that block the head reads), or
the class token everywhere. The ViT ×0.5 of benchmarks/disassembly.py, the five benchmark tasks, the paper's α/β,
components cut pure and re-fitted; test accuracy against the restricted base, FLOPs against the source's, all in
one run.

    nice -n 10 python benchmarks/vit_tokens.py [--dir runs/results-vit] [--doc docs/results.md]

Needs DIR/vit-w0.5.safetensors (`python benchmarks/disassembly.py --models vit --out-dir DIR`). Writes a section
between `<!-- vit-tokens:begin -->` and `<!-- vit-tokens:end -->`.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import Dataset

from modellego.core.blocks import units
from modellego.core.contributions import TokenLinear
from modellego.core.evaluate import predict
from modellego.core.reconstruct import RIDGE
from modellego.core.samples import resolve_classes, task_labels
from modellego.core.thresholds import PAPER
from modellego.core.tokens import cut_units, locate_units
from modellego.io.modelfile import load
from modellego.kinds import kind_of
from paper_common import write_block

ROOT = Path(__file__).resolve().parents[1]
# three of the five benchmark tasks (two, five and ten classes), to keep the run under half an hour here
TASKS = (("{T-shirt/top, Trouser}", "0,1"), ("classes 0–4", "0,1,2,3,4"), ("all 10 classes", "0,1,2,3,4,5,6,7,8,9"))
TOKEN_SETS = ("all tokens", "class token, last block", "class token everywhere")


def token_layers(model: torch.nn.Module) -> list[list[TokenLinear]]:
    """Every block's token layers (qkv, proj, fc1, fc2), block by block."""
    modules = dict(model.named_modules())
    blocks: dict[str, list[TokenLinear]] = {}
    for unit in units(model):
        block = unit.module.rpartition(".")[0]
        blocks.setdefault(block, []).extend([modules[unit.reader], modules[unit.writer]])
    return list(blocks.values())


def accuracy(model: torch.nn.Module, data, positions: list[int], outputs: int) -> float:
    """Accuracy of a component's task logits; `data` is labelled by the source's outputs (`positions`: the task's)."""
    logits, labels = predict(model.eval(), data)
    return float((logits.argmax(1) == task_labels(labels, positions, outputs)).float().mean())


def task_test(model: torch.nn.Module, manifest, kind, classes: str) -> tuple[list[int], Dataset, float]:
    """A task's classes (the source's output positions), its test samples and the source's restricted base on
    them (its logits restricted to the task)."""
    positions = resolve_classes(manifest.class_names, classes, "the model's classes")
    test = kind.data(manifest, "test", only=classes)
    logits, labels = predict(model.eval(), test)
    answers = logits[:, positions].argmax(1)
    return positions, test, float((answers == task_labels(labels, positions, len(manifest.classes))).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=ROOT / "runs" / "results-vit")
    parser.add_argument("--doc", type=Path, default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    source = load(args.dir / "vit-w0.5.safetensors")
    model, manifest = source.model, source.manifest
    kind = kind_of(manifest.architecture)
    train = kind.data(manifest, "train")
    source_flops = kind.count_flops(model, manifest.input)
    blocks = token_layers(model)
    rows = []
    for label, classes in TASKS:
        positions, test, restricted = task_test(model, manifest, kind, classes)
        task = list(range(len(positions)))
        for token_set in TOKEN_SETS:
            chosen = {"all tokens": [], "class token, last block": blocks[-1:],
                      "class token everywhere": blocks}[token_set]
            for layer in (layer for block in chosen for layer in block):
                layer.profiled_tokens = "class"
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    profile = kind.profile(model, train, classes=positions)
            finally:
                for block in blocks:
                    for layer in block:
                        layer.profiled_tokens = "all"
            masks = locate_units(model, profile, PAPER)
            component, cut = cut_units(model, masks, task)
            pure = accuracy(component, test, positions, len(manifest.classes))
            samples = kind.reconstruction_samples(train, profile, task, None, 0, model)
            kind.reconstruct(component, model, cut, samples, RIDGE)
            row = {"task": label, "tokens": token_set, "restricted_base": restricted, "pure": pure,
                   "reconstructed": accuracy(component, test, positions, len(manifest.classes)),
                   "flops_ratio": kind.count_flops(component, manifest.input) / source_flops,
                   "heads": sum(len(cut.outputs[unit.reader]) // (3 * unit.group) for unit in units(model)
                                if unit.kind == "heads"),
                   "neurons": sum(len(cut.outputs[unit.reader]) for unit in units(model) if unit.kind == "neurons")}
            rows.append(row)
            print(json.dumps(row), flush=True)
    seconds = time.perf_counter() - started
    heads = sum(unit.size for unit in units(model) if unit.kind == "heads")
    neurons = sum(unit.size for unit in units(model) if unit.kind == "neurons")
    lines = [f"Command: `python benchmarks/vit_tokens.py` ({seconds:.0f} s on this 2-core CPU). The ViT ×0.5 "
             "above; each token set profiles the task's classes (50 most confident correct training images each), "
             f"locates at the paper's α/β and cuts; `re-fitted` adds the closed-form re-fit. The source has {heads} "
             f"heads and {neurons} MLP neurons. Test images of each task.", "",
             "| Task | Token set | Restricted base % | pure % | re-fitted % | re-fitted − RB (pts) | heads | neurons "
             "| FLOPs ratio |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['task']} | {row['tokens']} | {100 * row['restricted_base']:.2f} | "
                     f"{100 * row['pure']:.2f} | {100 * row['reconstructed']:.2f} | "
                     f"{100 * (row['reconstructed'] - row['restricted_base']):+.2f} | {row['heads']} | "
                     f"{row['neurons']} | {row['flops_ratio']:.3f} |")
    text = "\n".join(lines)
    print(text)
    (args.dir / "tokens.json").write_text(json.dumps(rows, indent=1))
    if args.doc is not None:
        write_block("vit-tokens", text, args.doc)


if __name__ == "__main__":
    main()
