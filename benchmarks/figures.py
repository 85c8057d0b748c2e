"""Figures: decision routes of two Fashion-MNIST classes and two digits classes on LeNet-5, and heat maps of the
last conv layer of LeNet-5, VGG-16 ×0.25 and ResNet-18 ×0.25 on Fashion-MNIST and on digits — drawn with the
library's own `commands.route` / `commands.heatmap` (what `modellego route` / `modellego heatmap` run).

    python benchmarks/figures.py [--fashion lenet5,vgg16-w0.25,resnet18-w0.25]
                                 [--digits lenet5-digits,vgg16-w0.25-digits,resnet18-w0.25-digits] [--no-doc]

Fashion-MNIST models are the shared ones; digits models are trained here (scikit-learn's 8×8 digits drawn at
28×28, 1,437 training images; see DIGITS in paper_common.py).
"""

from __future__ import annotations

import argparse

from modellego import commands
from paper_common import command_line, elapsed, figure_path, log, source_model, source_profile, write_block

ROUTES = {"lenet5": "Trouser,Bag", "lenet5-digits": "3,8", "vgg16-w0.25": "Trouser,Bag"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fashion", default="lenet5,vgg16-w0.25,resnet18-w0.25")
    parser.add_argument("--digits", default="lenet5-digits,vgg16-w0.25-digits,resnet18-w0.25-digits")
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()
    names = [n for n in args.fashion.split(",") + args.digits.split(",") if n]
    route_lines, heat_lines = [], []
    for name in names:
        model, profile = source_model(name), source_profile(name)
        dataset = "digits" if name.endswith("-digits") else "Fashion-MNIST"
        if name in ROUTES:
            out = figure_path(f"route-{name}.png")
            routes = commands.route(model, profile, ROUTES[name], out)
            rows = routes.table()
            summary = "; ".join(f"{row.layer} {'/'.join(map(str, row.kept))} of {row.channels} "
                                f"({100 * row.shared:.0f}% shared)" for row in rows)
            route_lines += [f"**{name}** ({dataset}), classes {ROUTES[name]} — channels kept per class: {summary}.",
                            "", f"![routes of {ROUTES[name]} in {name}](figures/{out.name})", ""]
            log(f"{name}: route of {ROUTES[name]}")
        out = figure_path(f"heatmap-{name}.png")
        drawn = commands.heatmap(profile, out, model_path=model)
        heat_lines += [f"**{name}** ({dataset}), layer `{drawn.layer}` ({drawn.values.shape[1]} input channels)", "",
                       f"![heat map of {drawn.layer} in {name}](figures/{out.name})", ""]
        log(f"{name}: heat map of {drawn.layer}")
    command = command_line()
    text = "\n".join([
        "### Decision routes", "",
        "`modellego route MODEL --profile PROFILE --classes ... --out route.png` (paper α/β). One column per "
        "Conv2d/Linear layer in execution order; a dot per channel, in a class's colour when only that class keeps "
        "it, dark when both do, grey when neither does; lines join kept channels of connected layers, at most the "
        "40 strongest per class and pair of layers (opacity = contribution). Profiles: 50 most confident correct "
        f"training images per class. Made by `{command}`.", "", *route_lines,
        "### Contribution heat maps", "",
        "`modellego heatmap PROFILE --model MODEL --out heat.png` (default layer: the last conv). Row k, column i: "
        "the soft relative contribution R[k,o,i] of input channel i, averaged over the layer's output channels o "
        "that class k keeps (paper α/β) — the soft form of the votes that decide which channels a class keeps. "
        f"Made by `{command}` in {elapsed() / 60:.1f} min.", "", *heat_lines])
    if not args.no_doc:
        write_block("figures", text)
    print(text)


if __name__ == "__main__":
    main()
