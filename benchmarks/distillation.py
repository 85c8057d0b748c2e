"""Knowledge distillation: a student initialised from an MDA component (all classes) vs the same architecture
at the same size from scratch, and vs FPGM pruning to the same FLOPs, all distilled from the source model for
the same epochs; accuracy after every epoch, as a table and a plot.

    python benchmarks/distillation.py [--model vgg16-w0.25] [--epochs 4] [--train-per-class 150]
                                      [--test-per-class 200] [--variants pure,reconstructed] [--no-doc]

Distillation loss: ½·cross-entropy + ½·T²·KL(teacher‖student) at temperature T = 4 (Hinton et al.); Adam,
lr 1e-3, batch 64, the same fixed training slice and seed for every student.
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch.utils.data import DataLoader

from compression import STRONG
from modellego.benchmarking.prune import matched
from modellego.core.channels import ChannelGraph
from modellego.core.evaluate import evaluate
from modellego.core.reconstruct import reestimate_batchnorm
from modellego.io.profiles import load_profile
from modellego.train import seed_everything
from paper_common import (
    command_line,
    count_flops,
    elapsed,
    figure_path,
    human,
    load,
    log,
    make_component,
    measure,
    pct,
    publish,
    save_json,
    source_model,
    source_profile,
    test_slice,
    train_slice,
)

TEMPERATURE = 4.0


def scratch(model: torch.nn.Module) -> torch.nn.Module:
    """The same architecture and size with fresh random weights (every layer's own initialisation)."""
    fresh = copy.deepcopy(model)
    torch.manual_seed(0)
    for module in fresh.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return fresh


def distil(student, teacher, data, test_data, epochs: int) -> list[float]:
    """Distil `teacher` into `student` in place; accuracy on `test_data` before and after every epoch."""
    generator = seed_everything(0)
    loader = DataLoader(data, batch_size=64, shuffle=True, generator=generator)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    teacher.eval()
    history = [evaluate(student, test_data).accuracy]
    for _ in range(epochs):
        student.train()
        for images, labels in loader:
            with torch.no_grad():
                soft = F.softmax(teacher(images) / TEMPERATURE, dim=1)
            logits = student(images)
            loss = 0.5 * F.cross_entropy(logits, labels) + 0.5 * TEMPERATURE ** 2 * F.kl_div(
                F.log_softmax(logits / TEMPERATURE, dim=1), soft, reduction="batchmean")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        reestimate_batchnorm(student, data, samples=len(data), batch_size=64)
        history.append(evaluate(student, test_data).accuracy)
    return history


def run(name: str, epochs: int, train_per_class: int, per_class: int, variants: list[str]) -> dict:
    source = load(source_model(name))
    profile = load_profile(source_profile(name))
    graph = ChannelGraph(source.model, profile.input_shape)
    test_data = test_slice(source.manifest, per_class)
    data = train_slice(source.manifest, train_per_class)
    everything = list(range(len(source.manifest.classes)))
    students = {}
    for variant in variants:  # one cut, so one size, for both: the other students are made once
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            part = make_component(source, profile, everything, STRONG, variant, graph)
        students["MDA component" + ("" if variant == "pure" else f", {variant}")] = part.model
    budget = count_flops(part.model, part.manifest.input)  # the students' FLOPs: one cut, one size
    images = torch.stack([data[i][0] for i in range(0, len(data), max(1, len(data) // 100))])
    students |= {"same architecture, scratch": scratch(part.model),
                "FPGM-pruned source": matched(source.model, profile.input_shape, "fpgm", budget,
                                              images=images).model}
    curves, sizes = {}, {}
    for label, student in students.items():
        sizes[label] = measure(student, source.manifest, test_data)
        curves[label] = distil(student, source.model, data, test_data, epochs)
        log(f"{name}: {label}: " + " ".join(pct(a) for a in curves[label]))
    teacher = measure(source.model, source.manifest, test_data)
    return {"model": name, "variants": variants, "teacher": teacher, "curves": curves, "sizes": sizes,
            "thresholds": STRONG.as_dict()}


def plot(result: dict, train_per_class: int, per_class: int) -> str:
    figure = Figure(figsize=(7.5, 4.8), layout="constrained")
    axes = figure.add_subplot()
    for (label, curve), marker in zip(result["curves"].items(), "oPsd"):
        axes.plot(range(len(curve)), [100 * a for a in curve], marker=marker, label=label)
    axes.axhline(100 * result["teacher"]["accuracy"], color="#555555", linestyle=":", label="teacher (source)")
    axes.set_xlabel("distillation epoch (0 = the student as initialised)")
    axes.set_ylabel(f"test accuracy (%), {per_class} images per class")
    axes.set_xticks(range(len(next(iter(result["curves"].values())))))
    axes.legend(fontsize=8, loc="lower right")
    axes.set_title(f"Distilling {result['model']} (Fashion-MNIST) into students of "
                   f"{human(next(iter(result['sizes'].values()))['flops'])} FLOPs;\n{train_per_class} training "
                   f"images per class per epoch", fontsize=10)
    path = figure_path(f"distillation-{result['model']}.png")
    figure.savefig(path, dpi=120)
    return path.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vgg16-w0.25")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-per-class", type=int, default=150)
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--variants", default="pure,reconstructed")
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()
    result = run(args.model, args.epochs, args.train_per_class, args.test_per_class, args.variants.split(","))
    figure = plot(result, args.train_per_class, args.test_per_class)
    lines = ["| student | FLOPs | params | " + " | ".join(f"epoch {e}" for e in range(args.epochs + 1)) + " |",
             "|---|---|---|" + "---|" * (args.epochs + 1)]
    for label, curve in result["curves"].items():
        size = result["sizes"][label]
        lines.append(f"| {label} | {human(size['flops'])} | {human(size['params'])} | "
                     + " | ".join(pct(a) for a in curve) + " |")
    parts = [f"**{args.model}** (teacher {pct(result['teacher']['accuracy'])}, "
             f"{human(result['teacher']['flops'])} FLOPs)", "", *lines, "",
             f"![distillation accuracy per epoch](figures/{figure})", ""]
    results = [result]
    save_json("distillation", {"results": results, "seconds": elapsed()})
    thresholds = ", ".join(f"{k} {v}" for k, v in STRONG.as_dict().items())
    caption = (f"Teacher: {args.model} on Fashion-MNIST (all 10 classes). Students: the all-class MDA component "
               f"({thresholds}; the paper's method, and reconstructed without gradients on the profile's images "
               f"where the row says so); the same architecture re-initialised at random; the source pruned by FPGM "
               f"(torch-pruning) to the component's FLOPs. Each distilled for {args.epochs} epochs over the same "
               f"{args.train_per_class} training images per class (loss ½ CE + ½ T²·KL, T = 4, Adam lr 1e-3, "
               f"batch 64, seed 0; BatchNorm statistics re-estimated after each epoch), accuracy on "
               f"{args.test_per_class} test images per class. Made by `{command_line()}` in "
               f"{elapsed() / 60:.1f} min.")
    publish("distillation", "Knowledge distillation", caption, parts, args.no_doc)


if __name__ == "__main__":
    main()
