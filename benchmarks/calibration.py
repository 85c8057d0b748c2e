"""Calibrated assembly on real data: Score1 of every calibration (the paper's scaling, the out-of-distribution
gates, the contribution-pattern gate, the joint head) on the components `disassemble` cuts by default, the default
`assemble` (its choice, its file size), the paper's method end to end, the oracle gate, the jointly trained model,
and Score2 after one fine-tuning epoch from the default assembly vs from the paper's — for eleven assemblies,
measured in one run.

    nice -n 10 python benchmarks/calibration.py [--out-dir runs/calibration] [--doc docs/results.md]
        [--rows split-lenet5,three,...] [--finetune-epochs 1] [--finetune-rows split-lenet5,...]

Sources (reused when present in --out-dir; the shared ones are copied from $MODELLEGO_SHARED_MODELS (default runs/models, made by benchmarks/train_sources.sh) when they exist there):
- lenet5.safetensors: LeNet-5 on all 10 Fashion-MNIST classes (8 epochs, lr 2e-3);
- vgg16-w0.25.safetensors: VGG-16 ×0.25 on all 10 Fashion-MNIST classes (5 epochs, lr 2e-3);
- fashion-0-4 / fashion-5-9: LeNet-5 on Fashion-MNIST classes 0–4 / 5–9 only (4 epochs, lr 2e-3, as
  benchmarks/assembly.py); digits-all: LeNet-5 on scikit-learn digits (30 epochs).
Components are cut with the paper's α/β from profiles of 50 samples per class, re-fitted on the default
reconstruction images (what `disassemble` does without flags; components/), and without reconstruction for the
paper's column (components-pure/).
Score1/Score2 are on the real test splits of the assembly's classes; `auto` sees only each component's own
held-out training images. Writes a section between `<!-- calibration:begin -->` and `<!-- calibration:end -->`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
import warnings
from pathlib import Path

import torch

import modellego
from modellego import commands, data
from modellego.commands import assembly, assembly_base, choose_calibration, component, component_metrics, own_split
from modellego.commands.assemble import scaled
from modellego.core.assemble import assemble
from modellego.core.evaluate import evaluate, predict
from modellego.core.gates import CALIBRATIONS, GATES, PER_SAMPLE, raw_score
from modellego.core.gates import _gaussian as gaussian_of
from modellego.core.joint import fit as fit_joint
from modellego.core.joint import observe as observe_joint
from modellego.core.locate import locate
from modellego.core.profile import profile
from modellego.data.task import task_data
from modellego.io.manifest import Brick
from modellego.kinds.cnn import CNN, finetune

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MODELLEGO_SHARED_MODELS", ROOT / "runs" / "models"))  # benchmarks/train_sources.sh
BEGIN, END = "<!-- calibration:begin -->", "<!-- calibration:end -->"
START = time.monotonic()
FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def log(message: str) -> None:
    print(f"[{time.monotonic() - START:7.1f}s] {message}", flush=True)


def source(out_dir: Path, name: str) -> Brick:
    """A source model by name: reused from --out-dir, copied from the shared models, or trained here."""
    path = out_dir / f"{name}.safetensors"
    if not path.exists() and (SHARED / path.name).exists():
        shutil.copy(SHARED / path.name, path)
    if not path.exists():
        recipes = {"fashion-0-4": ("fashion-mnist", "0,1,2,3,4", 4), "fashion-5-9": ("fashion-mnist", "5,6,7,8,9", 4),
                   "digits-all": ("digits", None, 30), "lenet5": ("fashion-mnist", None, 8)}
        if name not in recipes:
            raise SystemExit(f"{path} is missing: run benchmarks/train_sources.sh first")
        dataset, classes, epochs = recipes[name]
        train_data = data.load(dataset, "train")
        if classes:
            train_data = data.select_classes(train_data, classes)
        log(f"train {name}: LeNet-5 on {dataset} {classes or 'all'}, {epochs} epochs")
        model, manifest = modellego.train_model("lenet5", train_data, epochs, lr=2e-3, progress=False)
        modellego.save(model, path, manifest)
    return modellego.load(path)


def part(out_dir: Path, source_name: str, task: list[str], reconstruct: bool = True) -> Brick:
    """The component of a source for `task` as `disassemble` cuts it by default (paper α/β from a profile of 50
    per class, re-fitted on the default reconstruction images), or the paper's pure cut (`reconstruct=False`)."""
    path = part_path(out_dir, source_name, task, reconstruct)
    if path.exists():
        return modellego.load(path)
    path.parent.mkdir(exist_ok=True)
    brick = source(out_dir, source_name)
    train = task_data(brick.manifest.classes, "train")
    class_profile = profile(brick.model, train, samples_per_class=50)
    rows = [brick.manifest.class_names.index(name) for name in task]
    samples = CNN().reconstruction_samples(train, class_profile, rows, None, 0, brick.model) if reconstruct else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cut = component(brick, locate(brick.model, class_profile), task, reconstruct_samples=samples)
    cut.manifest.metrics = component_metrics(cut, brick)
    modellego.save(cut.model, path, cut.manifest)
    return cut


def part_path(out_dir: Path, source_name: str, task: list[str], reconstruct: bool = True) -> Path:
    """Where `part` keeps a component: components/ (the default cut) or components-pure/."""
    folder = out_dir / ("components" if reconstruct else "components-pure")
    return folder / f"{source_name}--{'+'.join(t.replace('/', '_') for t in task)}.safetensors"


def rows() -> list[dict]:
    """The assemblies: (name, [(source, task)], how the jointly trained model is obtained)."""
    rng = random.Random(0)
    one_source, two_sources = [], []
    for _ in range(3):
        classes = rng.sample(FASHION, rng.choice([4, 5, 6]))
        cut = len(classes) // 2
        one_source.append([classes[:cut], classes[cut:]])
    for _ in range(3):
        low, high = rng.sample(FASHION[:5], rng.choice([2, 3])), rng.sample(FASHION[5:], rng.choice([2, 3]))
        two_sources.append([low, high])
    table = [{"name": "split-lenet5", "label": "LeNet-5 5+5 split (two 5-class sources)",
              "members": [("fashion-0-4", FASHION[:5]), ("fashion-5-9", FASHION[5:])], "joint": "lenet5"},
             {"name": "split-vgg16", "label": "VGG-16 ×0.25 5+5 split (one 10-class source)",
              "members": [("vgg16-w0.25", FASHION[:5]), ("vgg16-w0.25", FASHION[5:])], "joint": "vgg16-w0.25"},
             {"name": "new-user", "label": "LeNet-5 {T-shirt, Trouser} + {Sandal, Bag} (one source)",
              "members": [("lenet5", ["T-shirt/top", "Trouser"]), ("lenet5", ["Sandal", "Bag"])], "joint": "lenet5"}]
    for k, (first, second) in enumerate(one_source, 1):
        table.append({"name": f"one-source-{k}", "label": f"LeNet-5 one source: {{{', '.join(first)}}} + "
                      f"{{{', '.join(second)}}}", "members": [("lenet5", first), ("lenet5", second)], "joint": "lenet5"})
    for k, (first, second) in enumerate(two_sources, 1):
        table.append({"name": f"two-sources-{k}", "label": f"LeNet-5 two sources: {{{', '.join(first)}}} (0–4 model) + "
                      f"{{{', '.join(second)}}} (5–9 model)", "members": [("fashion-0-4", first), ("fashion-5-9", second)],
                      "joint": "lenet5"})
    table.append({"name": "cross-dataset", "label": "Fashion-MNIST {Trouser, Pullover, Sandal, Bag} + digits {0–4}",
                  "members": [("lenet5", ["Trouser", "Pullover", "Sandal", "Bag"]),
                              ("digits-all", ["0", "1", "2", "3", "4"])], "joint": None})
    table.append({"name": "three", "label": "three components: {T-shirt, Trouser, Pullover} + {Dress, Coat, Sandal} + "
                  "{Sneaker, Bag, Ankle boot} (one source)",
                  "members": [("lenet5", FASHION[0:3]), ("lenet5", FASHION[3:6]), ("lenet5", FASHION[7:10])],
                  "joint": "lenet5"})
    return table


def accuracy(model, manifest) -> float:
    return evaluate(model, task_data(manifest.classes, "test")).accuracy


def multilayer_mahalanobis(out_dir: Path, row: dict) -> dict:
    """The Mahalanobis gate on every Linear layer's input of each component at once (the joint head's features)
    instead of its classifier's input only, measured here rather than shipped: per component, class means and
    the shrunk shared covariance of those features on its own fit images (gates._gaussian), the score z-scored
    on the same images, the gate's mixture of the scaled components' posteriors; Score1 on the test images and
    routing accuracy (test images whose most typical component has their class)."""
    members = [part(out_dir, name, task) for name, task in row["members"]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manifest = assembly(members, "parallel", calibration="none").manifest
        scaled_members = [scaled(member, task_data(member.manifest.classes, "train")) for member in members]
    targets = torch.tensor([manifest.classes.index(ref) for m in members for ref in m.manifest.classes])
    test = task_data(manifest.classes, "test")
    test_images = torch.stack([test[k][0] for k in range(len(test))])
    parts, typical = [], []
    for member in scaled_members:
        model = member.model.eval()
        layers = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
        fit_data, _ = own_split(CNN(), task_data(member.manifest.classes, "train"))
        fit_images = torch.stack([fit_data[k][0] for k in range(len(fit_data))])
        with torch.no_grad():
            fit_features = torch.cat([observe_joint(model, batch, layers) for batch in fit_images.split(512)]).double()
            test_features = torch.cat([observe_joint(model, batch, layers) for batch in test_images.split(512)]).double()
            logits = torch.cat([model(batch) for batch in test_images.split(512)])
        gaussian = gaussian_of(fit_features, fit_data.targets, len(member.manifest.classes))

        def score(features: torch.Tensor) -> torch.Tensor:
            return raw_score("mahalanobis", None, features, [], gaussian)

        own = score(fit_features)
        typical.append((score(test_features) - own.mean()) / own.std())
        parts.append(logits.log_softmax(1))
    weights = torch.stack(typical, 1).log_softmax(1)
    mixed = torch.cat([part_ + weights[:, c:c + 1].float() for c, part_ in enumerate(parts)], 1)
    merged = torch.full((len(test), int(targets.max()) + 1), float("-inf")).scatter_reduce(
        1, targets.expand(len(test), -1), mixed, "amax")
    owners = [torch.tensor([manifest.classes.index(ref) for ref in m.manifest.classes]) for m in members]
    routed = torch.tensor([bool(torch.isin(label, owners[int(c)])) for label, c in zip(test.targets, weights.argmax(1))])
    return {"score1": (merged.argmax(1) == test.targets).float().mean().item(),
            "routing": routed.float().mean().item(), "layers": len(layers)}


def oracle(members: list[Brick], manifest) -> float:
    """The oracle gate: each test image is answered by (the first) component that has its class, scaled as the
    gates' components are."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        members = [scaled(member, task_data(member.manifest.classes, "train")) for member in members]
    test = task_data(manifest.classes, "test")
    correct = 0
    for member, (model, member_manifest) in enumerate(members):
        own = [manifest.classes.index(ref) for ref in member_manifest.classes]
        earlier = {ref for m in members[:member] for ref in m.manifest.classes}
        mine = [k for k, ref in enumerate(manifest.classes) if ref in member_manifest.classes and ref not in earlier]
        positions = torch.nonzero(torch.isin(test.targets, torch.tensor(mine))).flatten()
        if len(positions) == 0:
            continue
        from modellego.data.subsets import SampleSubset
        logits, labels = predict(model, SampleSubset(test, positions))
        correct += (torch.tensor(own)[logits.argmax(1)] == labels).sum().item()
    return correct / len(test)


def joint_accuracy(out_dir: Path, row: dict, manifest) -> float:
    """The jointly trained model: a source trained on all these classes (restricted to them), or for the
    cross-dataset row a LeNet-5 trained here on both datasets' classes together (4 epochs)."""
    if row["joint"] is not None:
        brick = source(out_dir, row["joint"])
        positions = torch.tensor([brick.manifest.classes.index(ref) for ref in manifest.classes])
        logits, labels = predict(brick.model, task_data(manifest.classes, "test"))
        return (logits[:, positions].argmax(1) == labels).float().mean().item()
    path = out_dir / f"joint-{row['name']}.safetensors"
    if path.exists():
        model, joint_manifest = modellego.load(path)
    else:
        train_data = task_data(manifest.classes, "train")
        log(f"train the joint model of {row['name']} (LeNet-5, {len(train_data)} images, 4 epochs)")
        model, joint_manifest = modellego.train_model("lenet5", train_data, 4, lr=2e-3, progress=False)
        modellego.save(model, path, joint_manifest)
    return accuracy(model, manifest)


def run_row(out_dir: Path, row: dict, finetune_epochs: int) -> dict:
    """Score1 of every calibration on the default (reconstructed) components: the `auto` protocol fits every one
    once on each component's own fit images and judges them on the own held-out images; the same statistics give
    each one's assembly. Parallel mode (padded gives the same logits: tests/core/test_calibration.py). Then the
    paper's method end to end (pure components, scaled), and the default assembly as a user gets it: `assemble`
    on the component files without flags, its file size against the components' files."""
    members = [part(out_dir, name, task) for name, task in row["members"]]
    pure = [part(out_dir, name, task, reconstruct=False) for name, task in row["members"]]
    result: dict = {"label": row["label"], "score1": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = assembly(members, "parallel", calibration="none")
        result["score1"]["none"] = accuracy(*plain)
        scaled_members = [scaled(member, task_data(member.manifest.classes, "train")) for member in members]
        pure_paper = assembly(pure, "padded", calibration="scale")
    manifest = plain.manifest
    result["pure_scale"] = accuracy(*pure_paper)
    targets = [manifest.classes.index(ref) for m in members for ref in m.manifest.classes]
    spec = manifest.input
    splits = [own_split(CNN(), task_data(member.manifest.classes, "train")) for member in scaled_members]
    candidates = ["scale", *GATES, "joint"]  # every one measured; `auto` itself chooses among the data-free ones
    _, record = choose_calibration(scaled_members, splits, targets, candidates=candidates)
    result["auto_held_out"] = record["held_out_accuracy"]
    for calibration in candidates:
        stats = record["fitted"].get(calibration)
        model = assemble([m.model for m in scaled_members], (spec.channels, *spec.size), "parallel", targets,
                         calibration=calibration if stats else None, stats=stats)
        result["score1"][calibration] = accuracy(model, manifest)
        log(f"{row['name']}: {calibration} Score1 {100 * result['score1'][calibration]:.2f}% "
            f"(held-out {100 * record['held_out_accuracy'].get(calibration, float('nan')):.2f}%)")
    started = time.monotonic()
    paths = [part_path(out_dir, name, task) for name, task in row["members"]]
    default_path = out_dir / "assemblies" / f"{row['name']}.safetensors"
    default_path.parent.mkdir(exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        built = commands.assemble([str(path) for path in paths], str(default_path), progress=False)
    result["auto_seconds"] = time.monotonic() - started
    result["auto_choice"], result["default_mode"] = built.calibration.value, built.mode.value
    result["score1"]["auto"] = accuracy(*modellego.load(default_path))
    result["default_bytes"] = default_path.stat().st_size
    result["component_bytes"] = sum(path.stat().st_size for path in paths)
    log(f"{row['name']}: default assemble chose {result['auto_choice']} ({result['default_mode']}, "
        f"{result['auto_seconds']:.0f} s): Score1 {100 * result['score1']['auto']:.2f}%, file "
        f"{result['default_bytes'] / result['component_bytes']:.2f}× the components'")
    result["classes"] = manifest.class_names
    result["base"] = assembly_base(manifest)
    result["oracle"] = oracle(members, manifest)
    result["joint"] = joint_accuracy(out_dir, row, manifest)
    log(f"{row['name']}: oracle {100 * result['oracle']:.2f}%, joint {100 * result['joint']:.2f}%, "
        f"base {100 * (result['base'] or 0):.2f}%, paper's method {100 * result['pure_scale']:.2f}%")
    if finetune_epochs:
        result["score2"] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            starts = {"default": modellego.load(default_path), "paper": pure_paper}
            for name, (model, start_manifest) in starts.items():
                tuned, tuned_manifest = finetune(model, start_manifest, epochs=finetune_epochs, progress=False)
                result["score2"][name] = accuracy(tuned, tuned_manifest)
                log(f"{row['name']}: Score2 from the {name} assembly {100 * result['score2'][name]:.2f}%")
    return result


def joint_study(out_dir: Path, name: str = "split-lenet5") -> list[dict]:
    """Which features the joint head reads, and its ridge: Score1 of the head on one row's default components
    with each component read at its classifier's input, at its first Linear layer's input (the flattened conv
    features), or at every Linear layer's input (the default when within budget), for λ from 1e-4 to 1e-1."""
    row = next(row for row in rows() if row["name"] == name)
    members = [part(out_dir, source_name, task) for source_name, task in row["members"]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manifest = assembly(members, "parallel", calibration="none").manifest
    targets = [manifest.classes.index(ref) for m in members for ref in m.manifest.classes]
    spec = manifest.input
    example = (spec.channels, *spec.size)
    fits = [own_split(CNN(), task_data(member.manifest.classes, "train"))[0] for member in members]
    linears = [[layer for layer, module in m.model.named_modules() if isinstance(module, torch.nn.Linear)]
               for m in members]
    choices = {"classifier input": [names[-1:] for names in linears], "first Linear input": [names[:1] for names in linears],
               "every Linear input": linears}
    study = []
    for label, layers in choices.items():
        for ridge in (1e-4, 1e-3, 1e-2, 1e-1):
            head = fit_joint([m.model for m in members], fits, targets, example, ridge=ridge, layers=layers)
            model = assemble([m.model for m in members], example, "parallel", targets, calibration="joint", stats=head)
            study.append({"features": label, "width": int(head["weight"].shape[1]), "ridge": ridge,
                          "score1": accuracy(model, manifest)})
            log(f"joint study {name}: {label} ({study[-1]['width']} features), ridge {ridge:g}: "
                f"{100 * study[-1]['score1']:.2f}%")
    return study


def percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def markdown(results: dict, args) -> str:
    names = [name for name in CALIBRATIONS if name != "none"]
    lines = [
        BEGIN,
        "## Calibrated assembly (issues 11, 24)",
        "",
        f"Commands: `benchmarks/train_sources.sh`, then `nice -n 10 python benchmarks/calibration.py --joint-study` "
        f"(every row; `--rows` and `--finetune-rows` pick some), then `python benchmarks/calibration.py --rows none "
        f"--multilayer --doc docs/results.md` ({results['seconds'] / 60:.0f} min in all on the shared 2-core CPU, "
        "which other jobs shared; Score2 only where a "
        "row was fine-tuned, `—` elsewhere). Components cut the way `disassemble` does by default: the paper's α/β "
        "from profiles of 50 samples per class, re-fitted on the default reconstruction images (README, "
        "\"Reconstruction\"). Every calibration fitted on at most 1,000 of each component's own training images per "
        "class; `auto` chooses on 100 further own training images per class of every component (README, "
        "\"Calibrated assembly\"). Score1 and the rest: accuracy (%) on the real test images of the assembly's "
        "classes. *Default*: `modellego assemble` on the component files without flags (the calibration `auto` "
        "chose, the default mode), measured from the file it wrote. *Paper*: the paper's method end to end: "
        "components cut without reconstruction, padded, parameter scaling. *Oracle*: each test image answered by "
        "the component that has its class. *Joint-trained*: a model trained on all the classes, restricted to the "
        "assembly's (the 10-class source; for the cross-dataset row a LeNet-5 trained on both datasets' classes for "
        "4 epochs). *Base*: the sources' mean Base on the assembly's classes. *File*: the default assembly's file "
        "against the sum of its components' files. Score2: after "
        f"{args.finetune_epochs} fine-tuning epoch(s) (Adam, lr 1e-3) of the default assembly / of the paper's.",
        "",
        "| assembly | none | " + " | ".join(f"{n}*" if n in PER_SAMPLE else n for n in names) +
        " | default (choice) | paper | oracle | joint-trained | base | file | Score2 default / paper |",
        "|---|" + "---|" * (len(names) + 8),
    ]
    for name, result in results["rows"].items():
        score1 = result["score1"]
        best = max(names, key=lambda n: score1.get(n, -1.0))
        cells = [f"**{percent(score1.get(n))}**" if n == best else percent(score1.get(n)) for n in ["none", *names]]
        score2 = result.get("score2")
        second = f"{percent(score2['default'])} / {percent(score2['paper'])}" if score2 else "—"
        ratio = result["default_bytes"] / result["component_bytes"]
        lines.append(f"| {result['label']} | " + " | ".join(cells) +
                     f" | {percent(score1['auto'])} ({result['auto_choice']}) | {percent(result['pure_scale'])} | "
                     f"{percent(result['oracle'])} | {percent(result['joint'])} | {percent(result['base'])} | "
                     f"{ratio:.2f}× | {second} |")
    lines += ["", "`none` = the components as they are; `scale` = the paper's parameter scaling (1/m_k); the gates and "
              "`joint` (a head fitted in closed form on all components' features) as in README (\"Calibrated "
              "assembly\"). \\* stores rows of training images in the file: never chosen by `auto`, only with "
              "`--store-training-data`. Bold: the best of the row. Its choice uses no test image.", ""]
    rows_done = results["rows"]
    below = [f"{r['label']} ({percent(r['score1']['auto'])} vs {percent(r['score1']['scale'])})"
             for r in rows_done.values() if r["score1"]["auto"] < r["score1"]["scale"] - 0.01]
    lines.append(f"- Default more than 1 point below the paper's scaling on the same components: "
                 f"{', '.join(below) if below else 'on no row'}.")
    below_paper = [r["label"] for r in rows_done.values() if r["score1"]["auto"] < r["pure_scale"] - 0.01]
    lines.append(f"- Default more than 1 point below the paper's method end to end: "
                 f"{', '.join(below_paper) if below_paper else 'on no row'}.")
    for key, what in (("split-lenet5", "LeNet-5 5+5 split"), ("three", "Three components")):
        if key in rows_done:
            row = rows_done[key]
            lines.append(f"- {what}: default {percent(row['score1']['auto'])}% ({row['auto_choice']}), "
                         f"{100 * (row['joint'] - row['score1']['auto']):.2f} points below the jointly trained model "
                         f"({percent(row['joint'])}%); the paper's method {percent(row['pure_scale'])}%, oracle "
                         f"{percent(row['oracle'])}%.")
    if "cross-dataset" in rows_done:
        cross = rows_done["cross-dataset"]
        lines.append(f"- Cross-dataset: default {percent(cross['score1']['auto'])}% vs the sources' mean Base "
                     f"{percent(cross['base'])}%.")
    ratios = [r["default_bytes"] / r["component_bytes"] for r in rows_done.values()]
    if ratios:
        lines.append(f"- Default assembly files: {min(ratios):.2f}–{max(ratios):.2f}× the sum of their components' "
                     "files; no file holds training images.")
    missing = [row["label"] for row in rows() if row["name"] not in rows_done]
    if missing:
        lines.append(f"- Not measured in this run: {', '.join(missing)}.")
    multilayer = {name: row for name, row in rows_done.items() if "mahalanobis_multilayer" in row}
    if multilayer:
        lines += ["", "The Mahalanobis gate on every Linear layer's input of each component (the joint head's features) "
                  "instead of its classifier's input only (`--multilayer`; measured, not shipped). Routing: test "
                  "images whose most typical component has their class:", "",
                  "| assembly | mahalanobis | mahalanobis, every Linear input (routing) | joint |", "|---|---|---|---|"]
        for row in multilayer.values():
            found = row["mahalanobis_multilayer"]
            lines.append(f"| {row['label']} | {percent(row['score1']['mahalanobis'])} | {percent(found['score1'])} "
                         f"({percent(found['routing'])}) | {percent(row['score1']['joint'])} |")
    if results.get("joint_study"):
        ridges = sorted({entry["ridge"] for entry in results["joint_study"]})
        lines += ["", "Which features the joint head reads, and its ridge λ (`--joint-study`: Score1 %, LeNet-5 5+5 split, "
                  "default components, parallel):", "",
                  "| features (per component) | width | " + " | ".join(f"λ = {r:g}" for r in ridges) + " |",
                  "|---|---|" + "---|" * len(ridges)]
        for label in dict.fromkeys(entry["features"] for entry in results["joint_study"]):
            entries = {e["ridge"]: e for e in results["joint_study"] if e["features"] == label}
            width = next(iter(entries.values()))["width"]
            lines.append(f"| {label} | {width} | " + " | ".join(percent(entries[r]["score1"]) if r in entries else "—"
                                                            for r in ridges) + " |")
    lines.append(END)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "calibration")
    parser.add_argument("--doc", type=Path, default=None)
    parser.add_argument("--rows", default=None, help="comma-separated row names (default: all)")
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--finetune-rows", default=None, help="fine-tune only these rows (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    parser.add_argument("--multilayer", action="store_true",
                        help="also measure the Mahalanobis gate on every Linear layer's input (not shipped)")
    parser.add_argument("--joint-study", action="store_true", help="also measure the joint head's features and ridge")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    wanted = set(args.rows.split(",")) if args.rows else None
    results_path = args.out_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"rows": {}}
    for row in rows():
        if wanted and row["name"] not in wanted:
            continue
        finetune_epochs = args.finetune_epochs if (args.finetune_rows is None or row["name"] in args.finetune_rows.split(",")) else 0
        results["rows"][row["name"]] = {**results["rows"].get(row["name"], {}), **run_row(args.out_dir, row, finetune_epochs)}
        results_path.write_text(json.dumps(results, indent=2))
    results["rows"] = {row["name"]: results["rows"][row["name"]] for row in rows() if row["name"] in results["rows"]}
    if args.joint_study:
        results["joint_study"] = joint_study(args.out_dir)
    if args.multilayer:
        for row in rows():
            if row["name"] in results["rows"]:
                found = results["rows"][row["name"]]["mahalanobis_multilayer"] = multilayer_mahalanobis(args.out_dir, row)
                log(f"{row['name']}: multi-layer Mahalanobis Score1 {100 * found['score1']:.2f}%, "
                    f"routing {100 * found['routing']:.2f}%")
    results["seconds"] = results.get("seconds", 0) + time.monotonic() - START
    results_path.write_text(json.dumps(results, indent=2))
    section = markdown(results, args)
    print(section)
    if args.doc:
        text = args.doc.read_text() if args.doc.exists() else "# Results\n\n"
        if BEGIN in text and END in text:
            text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END) + 1:]
        else:
            text = text.rstrip("\n") + "\n\n" + section
        args.doc.write_text(text)
        log(f"wrote {args.doc}")


if __name__ == "__main__":
    main()
