"""Is dropping residual-stream features worth it (docs/method.md, "Units")? For the zoo ViT ×0.5 of
benchmarks/disassembly.py and the five benchmark tasks: the re-fitted component at the paper's α/β (the stream
whole, what modellego cuts), against the same component with its stream narrowed to the features the head votes
for the task (S of docs/method.md's "Locating", over the task's classes) — the patch embedding's channels, the
class token, the position embeddings, every LayerNorm (its statistics then run over the kept features), the
blocks' stream columns and rows and the head's inputs — and every Linear layer then re-fitted by the same closed
form to the source's outputs. Test accuracy and FLOPs, all in one run.

    nice -n 10 python benchmarks/vit_stream.py [--dir runs/results-vit] [--doc docs/results.md]

Writes a section between `<!-- vit-stream:begin -->` and `<!-- vit-stream:end -->`.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from modellego.core.blocks import sliced_linear, units
from modellego.core.locate import input_mask
from modellego.core.reconstruct import RIDGE, LayerFit, in_memory, reconstruct
from modellego.core.thresholds import PAPER
from modellego.core.tokens import cut_units, locate_units
from modellego.io.modelfile import load
from modellego.kinds import kind_of
from modellego.kinds.cnn import shape_of
from paper_common import write_block
from vit_tokens import accuracy, task_test

ROOT = Path(__file__).resolve().parents[1]
TASKS = (("{T-shirt/top, Trouser}", "0,1"), ("{Dress, Sandal}", "3,5"), ("{Sandal, Sneaker, Ankle boot}", "5,7,9"),
         ("classes 0–4", "0,1,2,3,4"), ("all 10 classes", "0,1,2,3,4,5,6,7,8,9"))


def stream_features(profile, classifier: str) -> torch.Tensor:
    """The stream features (the head's inputs) some class of the task relies on: the head's votes at the paper's
    linear α/β (docs/method.md, "Locating", step 1)."""
    own = torch.zeros(len(profile.classes), profile.outputs, dtype=torch.bool)
    own[torch.arange(len(profile.classes)), torch.tensor(profile.output_positions, dtype=torch.long)] = True
    kept, _ = input_mask(profile.relative(classifier), own, *PAPER.pair("linear"))
    return torch.nonzero(kept.any(0)).flatten()


def narrow_stream(vit: nn.Module, features: torch.Tensor) -> None:
    """Keep only the stream's `features` in the zoo ViT `vit` (in place): exact slicing of every module that reads
    or writes the stream; the LayerNorms keep their affine parameters of those features."""
    with torch.no_grad():
        embed = vit.embed
        narrowed = nn.Conv2d(embed.in_channels, len(features), embed.kernel_size, embed.stride)
        narrowed.weight.copy_(embed.weight[features])
        narrowed.bias.copy_(embed.bias[features])
        vit.embed = narrowed
        vit.cls_token = nn.Parameter(vit.cls_token[..., features].clone())
        vit.cls_pos = nn.Parameter(vit.cls_pos[..., features].clone())
        vit.pos_embed = nn.Parameter(vit.pos_embed[:, features].clone())
        for module in list(vit.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, nn.LayerNorm):
                    norm = nn.LayerNorm(len(features), eps=child.eps)
                    norm.weight.copy_(child.weight[features])
                    norm.bias.copy_(child.bias[features])
                    setattr(module, name, norm)
        for block in vit.blocks:
            block.attn.qkv = sliced_linear(block.attn.qkv, None, features)
            block.attn.proj = sliced_linear(block.attn.proj, features, None)
            block.mlp.fc1 = sliced_linear(block.mlp.fc1, None, features)
            block.mlp.fc2 = sliced_linear(block.mlp.fc2, features, None)
        vit.head = sliced_linear(vit.head, None, features)


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
    width = model.net.head.in_features
    rows = []
    for label, classes in TASKS:
        positions, test, restricted = task_test(model, manifest, kind, classes)
        task = list(range(len(positions)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            profile = kind.profile(model, train, classes=positions)
            masks = locate_units(model, profile, PAPER)
            component, cut = cut_units(model, masks, task)
        samples = in_memory(kind.reconstruction_samples(train, profile, task, None, 0, model), shape_of(manifest.input))
        kind.reconstruct(component, model, cut, samples, RIDGE)
        whole = accuracy(component, test, positions, len(manifest.classes))
        whole_flops = kind.count_flops(component, manifest.input) / source_flops
        features = stream_features(profile, profile.layers[-1])
        narrow_stream(component.net, features)
        fits = {}
        for unit in units(model):
            fits[unit.reader] = LayerFit(None, None, cut.outputs[unit.reader])
            fits[unit.writer] = LayerFit(None, None, features)
        fits[cut.classifier] = LayerFit(None, None, cut.outputs[cut.classifier])
        reconstruct(component, model, fits, samples, RIDGE)
        row = {"task": label, "restricted_base": restricted, "stream_whole": whole, "stream_whole_flops": whole_flops,
               "features": len(features), "width": width, "stream_narrowed": accuracy(component, test, positions, len(manifest.classes)),
               "stream_narrowed_flops": kind.count_flops(component, manifest.input) / source_flops}
        rows.append(row)
        print(json.dumps(row), flush=True)
    seconds = time.perf_counter() - started
    lines = [f"Command: `python benchmarks/vit_stream.py` ({seconds:.0f} s on this 2-core CPU). The ViT ×0.5 "
             "above, the paper's α/β, re-fitted components; test images of each task.", "",
             "| Task | Restricted base % | stream whole % | FLOPs ratio | stream features kept | stream narrowed, "
             "re-fitted % | FLOPs ratio |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['task']} | {100 * row['restricted_base']:.2f} | {100 * row['stream_whole']:.2f} | "
                     f"{row['stream_whole_flops']:.3f} | {row['features']} of {row['width']} | "
                     f"{100 * row['stream_narrowed']:.2f} | {row['stream_narrowed_flops']:.3f} |")
    text = "\n".join(lines)
    print(text)
    (args.dir / "stream.json").write_text(json.dumps(rows, indent=1))
    if args.doc is not None:
        write_block("vit-stream", text, args.doc)


if __name__ == "__main__":
    main()
