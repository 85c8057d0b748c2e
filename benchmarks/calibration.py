"""Calibrated assembly on real data: Score1 of every calibration (the paper's scaling, the out-of-distribution
gates, the contribution-pattern gate, `auto`), the oracle gate, the jointly trained model, and Score2 after one
fine-tuning epoch from the best calibration vs from the paper's — for ten assemblies, measured in one run.

    nice -n 10 python benchmarks/calibration.py [--out-dir runs/calibration] [--doc docs/results.md]
        [--rows split-lenet5,pair-1,...] [--no-finetune]

Sources (reused when present in --out-dir; the shared ones are copied from $MODELLEGO_SHARED_MODELS (default runs/models, made by benchmarks/train_sources.sh) when they exist there):
- lenet5.safetensors: LeNet-5 on all 10 Fashion-MNIST classes (8 epochs, lr 2e-3);
- vgg16-w0.25.safetensors: VGG-16 ×0.25 on all 10 Fashion-MNIST classes (5 epochs, lr 2e-3);
- fashion-0-4 / fashion-5-9: LeNet-5 on Fashion-MNIST classes 0–4 / 5–9 only (4 epochs, lr 2e-3, as
  benchmarks/assembly.py); digits-all: LeNet-5 on scikit-learn digits (30 epochs).
Components are cut with the paper's α/β from profiles of 50 samples per class (the current `disassemble`).
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
from modellego import data
from modellego.commands import assembly, assembly_base, choose_calibration, component, component_metrics, own_split
from modellego.commands.assemble import scaled
from modellego.core.assemble import assemble
from modellego.core.evaluate import evaluate, predict
from modellego.core.gates import CALIBRATIONS, GATES, PER_SAMPLE
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


def part(out_dir: Path, source_name: str, task: list[str]) -> Brick:
    """The component of a source for `task` (paper α/β, profile of 50 per class), with its test metrics."""
    path = out_dir / "components" / f"{source_name}--{'+'.join(t.replace('/', '_') for t in task)}.safetensors"
    if path.exists():
        return modellego.load(path)
    path.parent.mkdir(exist_ok=True)
    brick = source(out_dir, source_name)
    class_profile = profile(brick.model, task_data(brick.manifest.classes, "train"), samples_per_class=50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cut = component(brick, locate(brick.model, class_profile), task)
    cut.manifest.metrics = component_metrics(cut, brick)
    modellego.save(cut.model, path, cut.manifest)
    return cut


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
    """Score1 of every calibration: the `auto` protocol fits every gate once on each component's own fit images
    and judges them on the own held-out images; the same statistics give each gate's assembly (so `auto`'s
    Score1 is its choice's). Parallel mode (padded gives the same logits: tests/test_calibration.py)."""
    members = [part(out_dir, name, task) for name, task in row["members"]]
    result: dict = {"label": row["label"], "score1": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = assembly(members, "parallel", calibration="none")
        result["score1"]["none"] = accuracy(*plain)
        scaled_members = [scaled(member, task_data(member.manifest.classes, "train")) for member in members]
    manifest = plain.manifest
    targets = [manifest.classes.index(ref) for m in members for ref in m.manifest.classes]
    spec = manifest.input
    started = time.monotonic()
    splits = [own_split(CNN(), task_data(member.manifest.classes, "train")) for member in scaled_members]
    candidates = ["scale", *GATES]  # every one measured; `auto` itself chooses among the data-free ones
    _, record = choose_calibration(scaled_members, splits, targets, candidates=candidates)
    data_free = {name: value for name, value in record["held_out_accuracy"].items() if name not in PER_SAMPLE}
    choice = max(data_free, key=lambda name: (data_free[name], -candidates.index(name)))  # auto's rule and ties
    result["auto_seconds"] = time.monotonic() - started
    result["auto_choice"], result["auto_held_out"] = choice, record["held_out_accuracy"]
    for calibration in ("scale", *GATES):
        stats = record["fitted"].get(calibration)
        model = assemble([m.model for m in scaled_members], (spec.channels, *spec.size), "parallel", targets,
                         calibration=calibration if stats else None, stats=stats)
        result["score1"][calibration] = accuracy(model, manifest)
        log(f"{row['name']}: {calibration} Score1 {100 * result['score1'][calibration]:.2f}% "
            f"(held-out {100 * record['held_out_accuracy'].get(calibration, float('nan')):.2f}%)")
    result["score1"]["auto"] = result["score1"][choice]
    log(f"{row['name']}: auto chose {choice} ({result['auto_seconds']:.0f} s)")
    result["classes"] = manifest.class_names
    result["base"] = assembly_base(manifest)
    result["oracle"] = oracle(members, manifest)
    result["joint"] = joint_accuracy(out_dir, row, manifest)
    log(f"{row['name']}: oracle {100 * result['oracle']:.2f}%, joint {100 * result['joint']:.2f}%, "
        f"base {100 * (result['base'] or 0):.2f}%")
    if finetune_epochs:
        best = max(GATES, key=lambda name: result["score1"][name])
        result["best"] = best
        result["score2"] = {}
        for calibration in dict.fromkeys([best, "scale"]):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                built = assembly(members, "padded", calibration=calibration, store_training_data=True)
                tuned, tuned_manifest = finetune(built.model, built.manifest, epochs=finetune_epochs, progress=False)
            result["score2"][calibration] = accuracy(tuned, tuned_manifest)
            log(f"{row['name']}: Score2 from {calibration} {100 * result['score2'][calibration]:.2f}%")
    return result


def percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def markdown(results: dict, args) -> str:
    names = list(CALIBRATIONS)
    lines = [
        BEGIN,
        "## Calibrated assembly (issue 11)",
        "",
        f"Commands: `benchmarks/train_sources.sh`, then `nice -n 10 python benchmarks/calibration.py` (every row; "
        f"`--rows` and `--finetune-rows` pick some), then `python benchmarks/calibration.py --rows none --doc "
        f"docs/results.md` ({results['seconds'] / 60:.0f} min in all on the shared 2-core CPU; Score2 only where a "
        "row was fine-tuned, `—` elsewhere). Components cut with the paper's α/β from profiles of 50 samples per class; every gate "
        "fitted on at most 1,000 of each component's own training images per class; `auto` chooses on 100 "
        "further own training images per class of every component (README, \"Calibrated assembly\"). Score1 and "
        "the rest: accuracy (%) on the real test images of the assembly's classes. *Oracle*: each test image "
        "answered by the component that has its class (the upper bound of any gate). *Joint*: a model trained on "
        "all the classes, restricted to the assembly's (the 10-class source; for the cross-dataset row a LeNet-5 "
        "trained on both datasets' classes for 4 epochs). *Base*: the sources' mean Base on the assembly's "
        f"classes. Score2: after {args.finetune_epochs} fine-tuning epoch(s) of the padded assembly (Adam, lr 1e-3).",
        "",
        "| assembly | " + " | ".join(names) + " | auto (choice) | oracle | joint | base | Score2 best / paper's |",
        "|---|" + "---|" * (len(names) + 5),
    ]
    for name, result in results["rows"].items():
        score1 = result["score1"]
        best_gate = max(GATES, key=lambda n: score1[n])
        cells = [f"**{percent(score1[n])}**" if n == best_gate else percent(score1[n]) for n in names]
        score2 = result.get("score2")
        second = (f"{percent(score2[result['best']])} ({result['best']}) / {percent(score2['scale'])}"
                  if score2 else "—")
        lines.append(f"| {result['label']} | " + " | ".join(cells) +
                     f" | {percent(score1['auto'])} ({result['auto_choice']}) | {percent(result['oracle'])} | "
                     f"{percent(result['joint'])} | {percent(result['base'])} | {second} |")
    lines += ["", "`none` = alignment padding only; `scale` = the paper's parameter scaling (1/m_k); the gates as in "
              "README (\"Calibrated assembly\"). Bold: the best gate of the row. `auto` is the default of "
              "`modellego assemble`; its choice uses no test image.", ""]
    rows_done = results["rows"]
    below = [r["label"] for r in rows_done.values() if r["score1"]["auto"] < r["score1"]["scale"] - 0.01]
    lines.append(f"- Default (`auto`) more than 1 point below the paper's scaling: "
                 f"{', '.join(below) if below else 'on no row'}.")
    if "split-lenet5" in rows_done:
        split = rows_done["split-lenet5"]
        lines.append(f"- LeNet-5 5+5 split: default {percent(split['score1']['auto'])}% "
                     f"({split['auto_choice']}), paper's scaling {percent(split['score1']['scale'])}%, "
                     f"oracle {percent(split['oracle'])}%, joint {percent(split['joint'])}%.")
    if "cross-dataset" in rows_done:
        cross = rows_done["cross-dataset"]
        lines.append(f"- Cross-dataset: default {percent(cross['score1']['auto'])}% vs the sources' mean Base "
                     f"{percent(cross['base'])}%.")
    missing = [row["label"] for row in rows() if row["name"] not in rows_done]
    if missing:
        lines.append(f"- Not measured in this run: {', '.join(missing)}.")
    lines.append(END)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "calibration")
    parser.add_argument("--doc", type=Path, default=None)
    parser.add_argument("--rows", default=None, help="comma-separated row names (default: all)")
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--finetune-rows", default=None, help="fine-tune only these rows (default: all)")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
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
