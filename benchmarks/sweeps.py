"""α/β sweeps (the paper's hyper-parameter figure): accuracy, FLOPs and params of a component as α or β of the
conv layers, then of the linear layers, varies (the other three thresholds at the paper's values).

    python benchmarks/sweeps.py [--models lenet5,vgg16-w0.25] [--classes "Pullover,Coat,Shirt"]
                                [--test-per-class 300] [--variants pure,reconstructed] [--no-doc]

Source models: the shared Fashion-MNIST models (see benchmarks/paper_common.py). Writes
docs/figures/sweep-MODEL.png, a table into docs/results.md (markers `sweeps:begin/end`) and runs/paper/sweeps.json.
"""

from __future__ import annotations

import argparse
import warnings

from matplotlib.figure import Figure

from modellego.core.channels import ChannelGraph
from modellego.io.profiles import load_profile
from paper_common import (
    PAPER,
    Thresholds,
    command_line,
    elapsed,
    figure_path,
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
)

VALUES = [round(0.1 * step, 1) for step in range(10)]
SWEEPS = [("conv", "alpha_conv", "α"), ("conv", "beta_conv", "β"), ("linear", "alpha_fc", "α"), ("linear", "beta_fc", "β")]


def sweep(name: str, classes: str, per_class: int, variant: str) -> dict:
    model_path, profile_path = source_model(name), source_profile(name)
    source = load(model_path)
    profile = load_profile(profile_path)
    graph = ChannelGraph(source.model, profile.input_shape)
    base = measure(source.model, source.manifest, test_slice(source.manifest, per_class))
    rows = []
    test_data = None
    for kind, key, _ in SWEEPS:
        for value in VALUES:
            thresholds = Thresholds(**{**PAPER.as_dict(), key: value})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                part = make_component(source, profile, classes, thresholds, variant, graph)
            test_data = test_data or test_slice(part.manifest, per_class)
            metrics = measure(part.model, part.manifest, test_data)
            rows.append({"model": name, "kind": kind, "parameter": key, "value": value, **metrics})
        log(f"{name}: swept {key}")
    restricted = restricted_base(source, part.manifest, test_data)
    return {"model": name, "source": base, "restricted_base": restricted, "rows": rows, "variant": variant}


def restricted_base(source, manifest, test_data) -> float:
    """The source's accuracy on the task's test slice, its logits restricted to the task's classes."""
    from modellego.core.evaluate import predict

    logits, labels = predict(source.model, test_data)
    task = [ref.index for ref in manifest.classes]
    return (logits[:, task].argmax(1) == labels).float().mean().item()


def plot(result: dict, classes: str, per_class: int) -> str:
    name, source = result["model"], result["source"]
    figure = Figure(figsize=(12, 7.5), layout="constrained")
    panels = figure.subplots(2, 2)
    for panel, (kind, key, letter) in zip(panels.flatten(), SWEEPS):
        rows = [row for row in result["rows"] if row["parameter"] == key]
        xs = [row["value"] for row in rows]
        panel.plot(xs, [100 * row["accuracy"] for row in rows], "o-", color="#1f77b4", label="accuracy")
        panel.axhline(100 * result["restricted_base"], color="#1f77b4", linestyle=":", label="restricted base")
        panel.set_ylabel("test accuracy (%)", color="#1f77b4")
        panel.set_xlabel(f"{letter} of the {kind} layers ({key}); the others at the paper's values")
        twin = panel.twinx()
        twin.plot(xs, [100 * row["flops"] / source["flops"] for row in rows], "s--", color="#d62728", label="FLOPs")
        twin.plot(xs, [100 * row["params"] / source["params"] for row in rows], "^--", color="#2ca02c", label="params")
        twin.set_ylabel("% of the source model", color="#d62728")
        twin.set_ylim(0, 105)
        default = getattr(PAPER, key)
        panel.axvline(default, color="#999999", linewidth=0.8)
        panel.set_title(f"{name}: {key} (paper: {default})", fontsize=10)
        lines = panel.get_legend_handles_labels()
        more = twin.get_legend_handles_labels()
        panel.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="lower left")
    variant = result["variant"]
    how = "the paper's method" if variant == "pure" else "reconstructed without gradients"
    figure.suptitle(f"α/β sweep, component for {{{classes}}} cut from {name} (Fashion-MNIST), no training, "
                    f"{how};\naccuracy on {per_class} test images per class", fontsize=11)
    path = figure_path(f"sweep-{name}.png" if variant == "pure" else f"sweep-{name}-{variant}.png")
    figure.savefig(path, dpi=110)
    return path.name


def table(result: dict) -> str:
    source = result["source"]
    lines = ["| sweep | " + " | ".join(str(v) for v in VALUES) + " |", "|---|" + "---|" * len(VALUES)]
    for kind, key, _ in SWEEPS:
        rows = [row for row in result["rows"] if row["parameter"] == key]
        lines.append(f"| {key}: accuracy | " + " | ".join(pct(row["accuracy"]) for row in rows) + " |")
        lines.append(f"| {key}: FLOPs | " + " | ".join(f"{100 * row['flops'] / source['flops']:.0f}%" for row in rows)
                     + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="lenet5,vgg16-w0.25")
    parser.add_argument("--classes", default="Pullover,Coat,Shirt")
    parser.add_argument("--test-per-class", type=int, default=300)
    parser.add_argument("--variants", default="pure,reconstructed")
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()
    results, parts = [], []
    for variant in args.variants.split(","):
        for name in args.models.split(","):
            result = sweep(name, args.classes, args.test_per_class, variant)
            results.append(result)
            figure = plot(result, args.classes, args.test_per_class)
            parts += [f"**{name}** ({variant}; source: {pct(result['source']['accuracy'])} on all 10 classes, "
                      f"restricted base on the task {pct(result['restricted_base'])}, "
                      f"{result['source']['flops']:,} FLOPs, {result['source']['params']:,} params)", "",
                      table(result), "", f"![α/β sweep of {name}](figures/{figure})", ""]
    save_json("sweeps", {"results": results, "seconds": elapsed()})
    caption = (f"Component for {{{args.classes}}} (Fashion-MNIST), cut without training from each source model, "
               f"as one threshold varies over {VALUES[0]}…{VALUES[-1]} and the other three stay at the paper's "
               f"(α_conv 0.3, β_conv 0.2, α_fc 0.4, β_fc 0.3). Accuracy on {args.test_per_class} test images per "
               f"class (fixed seed 0); FLOPs for one image as a share of the source's. Profile: 50 most confident "
               f"correct images per class, chosen from 1,000 training images per class. "
               f"Made by `{command_line()}` in {elapsed() / 60:.1f} min.")
    publish("sweeps", "α/β sweeps", caption, parts, args.no_doc)


if __name__ == "__main__":
    main()
