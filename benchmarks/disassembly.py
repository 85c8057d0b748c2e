"""Disassembly results on Fashion-MNIST: train, profile, disassemble (the paper's pure method, + reconstruction,
+ reconstruction with --auto), evaluate.

    python benchmarks/disassembly.py [--out-dir runs/results] [--models lenet5,vgg16,resnet18] [--vgg-width 0.25]
                                     [--epochs lenet5=8,vgg16=5] [--lr lenet5=2e-3,vgg16=2e-3] [--max-drop 1.0]
                                     [--settings pure,reconstruct,reconstruct-300,auto] [--flatten-study]
                                     [--doc docs/results.md] [--no-doc]

Every step runs the `modellego` command line (as `python -m modellego ...`, the same program as the
`modellego` command), so the commands it prints are exactly what anyone can rerun:

1. `modellego train` each source model on all 10 Fashion-MNIST classes, seed 0 — reused when the model
   file is already in --out-dir and was trained with the same settings;
2. `modellego profile` it (50 most confident correct training samples per class) — reused likewise;
3. for every task, `modellego disassemble` with the paper's defaults (α_conv=0.3 β_conv=0.2 α_fc=0.4
   β_fc=0.3) and `--no-reconstruct` (`pure`, the paper's method), the same with reconstruction (`reconstruct`,
   the default), the same re-fitted on 300 training images per class (`reconstruct-300`,
   `--reconstruct-samples 300`), and `--auto --max-drop 1.0` with reconstruction (`auto`; not run by
   default: `auto-300` re-fits every candidate on 300 images per class, `auto-fine` searches a grid of step
   0.05, `auto-300-fine` both), then
   `modellego eval COMPONENT --against MODEL --json`; with `--flatten-study`, also `pure` and `reconstruct`
   with the other `--flatten` rule (settings marked `keep-all` / `any-feature`);
4. print a markdown table and write it into --doc between the markers
   `<!-- results:begin -->` / `<!-- results:end -->` (the rest of the page is kept; a missing page is
   created with a minimal header). The raw numbers go to OUT_DIR/results.json.

Each step prints one line with the elapsed time; each command's own output goes to OUT_DIR/logs/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from modellego.core.blocks import unit_sizes
from modellego.io.modelfile import load

ROOT = Path(__file__).resolve().parents[1]
DATA = "fashion-mnist"
SEED = 0
SAMPLES_PER_CLASS = 50
DEFAULTS = {"alpha_conv": 0.3, "beta_conv": 0.2, "alpha_fc": 0.4, "beta_fc": 0.3}
TASKS: list[tuple[str, str]] = [  # (short name for files, --classes)
    ("tshirt-trouser", "T-shirt/top,Trouser"),
    ("dress-sandal", "Dress,Sandal"),
    ("sandal-sneaker-boot", "Sandal,Sneaker,Ankle boot"),
    ("classes0-4", "0,1,2,3,4"),
    ("all10", "0,1,2,3,4,5,6,7,8,9"),
]
TASK_LABELS = {
    "tshirt-trouser": "{T-shirt/top, Trouser}",
    "dress-sandal": "{Dress, Sandal}",
    "sandal-sneaker-boot": "{Sandal, Sneaker, Ankle boot}",
    "classes0-4": "classes 0–4",
    "all10": "all 10 classes",
}
MODEL_DEFAULTS = {  # per model: width, epochs, peak lr (Adam, one-cycle), batch size 128
    "lenet5": {"width": 1.0, "epochs": 8, "lr": 2e-3},
    "vgg16": {"width": 0.25, "epochs": 5, "lr": 2e-3},
    "resnet18": {"width": 0.25, "epochs": 5, "lr": 2e-3},
    "vit": {"width": 0.5, "epochs": 4, "lr": 2e-3},
    "swin": {"width": 1.0, "epochs": 4, "lr": 2e-3},
}
LABELS = {"lenet5": "LeNet-5", "vgg16": "VGG-16-BN", "resnet18": "ResNet-18", "vit": "ViT", "swin": "Swin"}
SETTINGS = {  # name -> extra `disassemble` flags
    "pure": ["--no-reconstruct"],
    "reconstruct": [],
    "reconstruct-300": ["--reconstruct-samples", "300"],
    "auto": ["--auto"],
    "auto-300": ["--auto", "--reconstruct-samples", "300"],
    "auto-fine": ["--auto", "--grid-step", "0.05"],
    "auto-300-fine": ["--auto", "--reconstruct-samples", "300", "--grid-step", "0.05"],
}
OTHER_FLATTEN = {"any-feature": "keep-all", "keep-all": "any-feature"}
START = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - START:7.1f}s] {message}", flush=True)


def per_model(text: str | None, models: list[str], kind: type, what: str) -> dict[str, object]:
    """`--epochs 8` (every model) or `--epochs lenet5=8,vgg16=5` (per model)."""
    if not text:
        return {}
    if "=" not in text:
        return {m: kind(text) for m in models}
    out = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        if name.strip() not in MODEL_DEFAULTS:
            sys.exit(f"--{what}: unknown model {name!r}")
        out[name.strip()] = kind(value)
    return out


def shell(args: list[str]) -> str:
    """A command as it would be typed (`modellego ...`), quoting what needs it."""
    import shlex

    return " ".join(shlex.quote(str(a)) for a in args)


class Runner:
    def __init__(self, out_dir: Path) -> None:
        self.logs = out_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.commands: list[str] = []
        self.failures: list[str] = []

    def __call__(self, args: list[str], log_name: str, step: str) -> str | None:
        """Run `modellego ARGS`; returns stdout, or None (reported) when it fails."""
        command = "modellego " + shell(args)
        self.commands.append(command)
        t0 = time.monotonic()
        log(f"{step} ...")
        result = subprocess.run([sys.executable, "-m", "modellego", *map(str, args)], capture_output=True,
                                text=True, cwd=ROOT)
        (self.logs / f"{log_name}.log").write_text(f"$ {command}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}")
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-15:]
            self.failures.append(f"`{command}` exited {result.returncode}: " + " / ".join(tail))
            log(f"{step} FAILED (exit {result.returncode}, {time.monotonic() - t0:.1f}s): {command}")
            print("    " + "\n    ".join(tail), flush=True)
            return None
        log(f"{step} done ({time.monotonic() - t0:.1f}s)")
        return result.stdout


def parse_json(text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        return json.loads(text[text.index("{"):])
    except ValueError:
        return None


def settings_match(run: Runner, model_file: Path, width: float, epochs: int, lr: float) -> bool:
    info = parse_json(run(["info", model_file, "--json"], f"info-{model_file.stem}", f"read {model_file.name}"))
    if not info:
        return False
    trained = info.get("provenance", {}).get("trained", {})
    return (info.get("architecture", {}).get("width") == width and trained.get("epochs") == epochs
            and abs(float(trained.get("lr", -1)) - lr) < 1e-12 and trained.get("seed") == SEED
            and trained.get("dataset") == DATA and info.get("architecture", {}).get("num_classes") == 10)


def pct(x: float) -> str:
    return f"{100 * x:.2f}"


def human(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def table(rows: list[dict]) -> str:
    head = ("| Model | Task | Setting | Base % | Restricted base % | Disa % | Disa − RB (pts) "
            "| Params (comp / source) | Params ratio | FLOPs (comp / source) | FLOPs ratio | α_conv / β_conv / α_fc / β_fc |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['model_label']} | {TASK_LABELS[r['task']]} | {r['setting']} | failed: {r['error']} "
                         + "| " * 8 + "|")
            continue
        e = r["eval"]
        d = r["thresholds"]
        thresholds = " / ".join(f"{d[k]:g}" if k in d else "–" for k in ("alpha_conv", "beta_conv", "alpha_fc",
                                                                       "beta_fc")) if d else "?"
        delta = 100 * (e["accuracy"] - e["restricted_base"])
        lines.append(
            f"| {r['model_label']} | {TASK_LABELS[r['task']]} | {r['setting']} | {pct(e['base'])} | {pct(e['restricted_base'])} "
            f"| {pct(e['accuracy'])} | {delta:+.2f} | {human(e['params'])} / {human(e['source_params'])} "
            f"| {e['params'] / e['source_params']:.3f} | {human(e['flops'])} / {human(e['source_flops'])} "
            f"| {e['flops'] / e['source_flops']:.3f} | {thresholds} |")
    return "\n".join(lines)


def units_table(rows: list[dict], sources: dict) -> list[str]:
    """Heads / MLP neurons each Transformer component keeps per block, beside its source's; settings that keep
    the same units (pure and reconstruct: the re-fit changes weights, not units) share a row."""
    lines = []
    for name, source in sources.items():
        blocks = list(dict.fromkeys(module.rsplit(".", 1)[0] for module in source.get("units", {})))
        kept: dict[tuple, list[str]] = {}
        for r in rows:
            if r["model"] == name and r.get("units"):
                kept.setdefault((r["task"], tuple(sorted(r["units"].items()))), []).append(r["setting"])
        if not blocks or not kept:
            continue
        full = source["units"]
        lines += ["", f"Units kept per block by the {source['label']} components (heads / MLP neurons; the source keeps "
                  + ", ".join(sorted({f"{full[b + '.attn']} / {full[b + '.mlp']}" for b in blocks}))
                  + " in every block):", "",
                  "| Task | Setting | " + " | ".join(f"block {k}" for k in range(len(blocks))) + " |",
                  "|---|---|" + "---|" * len(blocks)]
        for (task, units), settings in kept.items():
            units = dict(units)
            lines.append(f"| {TASK_LABELS[task]} | {', '.join(settings)} | "
                         + " | ".join(f"{units.get(b + '.attn', '?')} / {units.get(b + '.mlp', '?')}" for b in blocks)
                         + " |")
    return lines


def below_restricted(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if r.get("error"):
            continue
        e = r["eval"]
        delta = 100 * (e["accuracy"] - e["restricted_base"])
        if e["accuracy"] < e["restricted_base"]:
            out.append(f"{r['model_label']}, {TASK_LABELS[r['task']]}, {r['setting']}: Disa {pct(e['accuracy'])}% "
                       f"vs restricted base {pct(e['restricted_base'])}% ({delta:+.2f} points)")
    return out


def markers(block: str = "results") -> tuple[str, str]:
    """The doc's markers around a table: `<!-- BLOCK:begin -->` and `<!-- BLOCK:end -->`."""
    return f"<!-- {block}:begin -->", f"<!-- {block}:end -->"


def results_block(rows: list[dict], sources: dict, elapsed: float, failures: list[str],
                  block: str = "results") -> str:
    begin, end = markers(block)
    parts = [begin, "", "Source models (all 10 classes, Fashion-MNIST test split, 10,000 images):", ""]
    parts += ["| Model | Width | Epochs | Peak lr | Test accuracy % | Params | FLOPs |", "|---|---|---|---|---|---|---|"]
    for s in sources.values():
        parts.append(f"| {s['label']} | {s['width']:g} | {s['epochs']} | {s['lr']:g} | {pct(s['accuracy'])} "
                     f"| {human(s['params'])} | {human(s['flops'])} |" if s.get("accuracy") is not None
                     else f"| {s['label']} | {s['width']:g} | {s['epochs']} | {s['lr']:g} | failed | | |")
    parts += ["", "Components (each task's test images; `pure` = the paper's method, α_conv 0.3, β_conv 0.2, "
              "α_fc 0.4, β_fc 0.3, `--no-reconstruct`; `reconstruct` = the same α/β with reconstruction on the "
              "default images (enough to determine every re-fitted layer, README \"Reconstruction\"; the "
              "profile's 50 per class when they are enough); `reconstruct-300` = the same on 300 "
              "training images per class (`--reconstruct-samples 300`); `auto` = `--auto --max-drop 1.0` with reconstruction):", "", table(rows), ""]
    for setting in dict.fromkeys(r["setting"] for r in rows):
        within = [r for r in rows if r["setting"] == setting and not r.get("error")]
        if within and not setting.startswith("auto"):
            close = [r for r in within if r["eval"]["accuracy"] >= r["eval"]["restricted_base"] - 0.01]
            parts.append(f"- `{setting}` at the paper's α/β: {len(close)} of {len(within)} rows within 1 point of "
                         "the restricted base.")
    parts += units_table(rows, sources)
    parts.append("")
    below = below_restricted(rows)
    parts.append("Rows where Disa is below the restricted base:" if below else
                 "No row has Disa below the restricted base.")
    parts += [f"- {b}" for b in below]
    if failures:
        parts += ["", "Commands that failed:"] + [f"- {f}" for f in failures]
    autos = [r for r in rows if r["setting"].startswith("auto") and r.get("auto")]
    if autos:
        parts += ["", "`--auto` search (held-out *training* images of the task, 10% per class, not the profile's samples):", ""]
        for r in autos:
            a = r["auto"]
            parts.append(f"- {r['model_label']}, {TASK_LABELS[r['task']]}: validation restricted base "
                         f"{pct(a['validation_restricted_base'])}%, chosen component {pct(a['validation_accuracy'])}% "
                         f"on {a['validation_samples']} images, {a.get('evaluated', '?')} of {a.get('grid', '?')} "
                         f"grid points evaluated in {r.get('seconds', 0):.0f} s; Pareto front "
                         + ", ".join(f"{c.get('alpha_conv', c.get('alpha_fc')):g}/"
                                     f"{c.get('beta_conv', c.get('beta_fc')):g}: {pct(c['accuracy'])}% at "
                                     f"{human(c['flops'])}" for c in a.get("pareto", []))
                         + ("" if a.get("met_target") else
                                                                  " — NO candidate met the target; most accurate chosen"))
    parts += ["", f"_Generated by `python benchmarks/disassembly.py` in {elapsed / 60:.1f} min "
              f"({time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, {os.cpu_count()} CPU cores)._", "", end]
    return "\n".join(parts)


def write_doc(doc: Path, block: str, name: str = "results") -> None:
    begin, end = markers(name)
    if doc.exists() and begin in (text := doc.read_text()) and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = "# Disassembly results\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path("runs/results"))
    parser.add_argument("--models", default="lenet5,vgg16,resnet18")
    parser.add_argument("--settings", default="pure,reconstruct,reconstruct-300,auto", help="which of: " + ", ".join(SETTINGS))
    parser.add_argument("--flatten-study", action="store_true",
                        help="also pure and reconstruct with the other --flatten rule")
    parser.add_argument("--vgg-width", type=float, default=MODEL_DEFAULTS["vgg16"]["width"])
    parser.add_argument("--epochs", help="N for every model, or lenet5=8,vgg16=5")
    parser.add_argument("--lr", help="peak learning rate: LR for every model, or lenet5=2e-3,vgg16=2e-3")
    parser.add_argument("--max-drop", type=float, default=1.0, help="--auto's allowed drop, accuracy points")
    parser.add_argument("--tasks", help="comma-separated subset of: " + ", ".join(t for t, _ in TASKS))
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--no-doc", action="store_true", help="print the table only")
    parser.add_argument("--block", default="results", help="the doc's markers: <!-- BLOCK:begin --> ... end")
    args = parser.parse_args()

    from modellego.core.locate import DEFAULT_FLATTEN as default_flatten

    for setting in args.settings.split(","):
        if setting not in SETTINGS:
            sys.exit(f"--settings: {setting!r} is not one of {', '.join(SETTINGS)}")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in MODEL_DEFAULTS:
            sys.exit(f"--models: {m!r} is not one of {', '.join(MODEL_DEFAULTS)}")
    epochs = per_model(args.epochs, models, int, "epochs")
    lrs = per_model(args.lr, models, float, "lr")
    tasks = TASKS if not args.tasks else [t for t in TASKS if t[0] in args.tasks.split(",")]
    out_dir = args.out_dir if args.out_dir.is_absolute() else ROOT / args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    run = Runner(out_dir)
    rel = lambda p: p.relative_to(ROOT) if p.is_relative_to(ROOT) else p  # noqa: E731

    sources: dict[str, dict] = {}
    rows: list[dict] = []
    for name in models:
        cfg = dict(MODEL_DEFAULTS[name])
        if name == "vgg16":
            cfg["width"] = args.vgg_width
        cfg["epochs"] = epochs.get(name, cfg["epochs"])
        cfg["lr"] = lrs.get(name, cfg["lr"])
        label = LABELS[name] if cfg["width"] == 1.0 else f"{LABELS[name]} ×{cfg['width']:g}"
        stem = name if cfg["width"] == 1.0 else f"{name}-w{cfg['width']:g}"
        model_file, profile_file = out_dir / f"{stem}.safetensors", out_dir / f"{stem}.profile.safetensors"
        source = {"label": label, **cfg, "file": str(rel(model_file))}
        sources[name] = source

        # 1. train (or reuse)
        if model_file.exists() and settings_match(run, rel(model_file), cfg["width"], cfg["epochs"], cfg["lr"]):
            log(f"reusing {rel(model_file)} (same settings)")
        else:
            if model_file.exists():
                log(f"{rel(model_file)} was trained with other settings: retraining")
                profile_file.unlink(missing_ok=True)
            ok = run(["train", "--model", name, "--data", DATA, "--epochs", cfg["epochs"], "--width", cfg["width"],
                      "--lr", cfg["lr"], "--seed", SEED, "--out", rel(model_file)],
                     f"train-{stem}", f"train {label} ({cfg['epochs']} epochs, width {cfg['width']:g})")
            if ok is None:
                continue
            profile_file.unlink(missing_ok=True)
        evaluation = parse_json(run(["eval", rel(model_file), "--json"], f"eval-{stem}", f"evaluate {label}"))
        if evaluation:
            source.update(accuracy=evaluation["accuracy"], params=evaluation["params"], flops=evaluation["flops"])
            log(f"{label}: test accuracy {pct(evaluation['accuracy'])}%")
        if units := unit_sizes(load(model_file).model):  # a Transformer's heads and MLP neurons per block
            source["units"] = units

        # 2. profile (or reuse)
        if profile_file.exists():
            log(f"reusing {rel(profile_file)}")
        elif run(["profile", rel(model_file), "--samples-per-class", SAMPLES_PER_CLASS, "--out", rel(profile_file)],
                 f"profile-{stem}", f"profile {label}") is None:
            continue

        # 3. disassemble and evaluate
        settings = [(setting, SETTINGS[setting]) for setting in args.settings.split(",")]
        if args.flatten_study:
            other = OTHER_FLATTEN[default_flatten]
            settings += [(f"{setting} {other}", SETTINGS[setting] + ["--flatten", other])
                         for setting in ("pure", "reconstruct")]
        for task, classes in tasks:
            for setting, flags in settings:
                comp = out_dir / f"{stem}-{task}-{setting.replace(' ', '-')}.safetensors"
                comp.unlink(missing_ok=True)
                extra = [*flags, *(["--max-drop", args.max_drop] if "--auto" in flags else [])]
                started = time.monotonic()
                row = {"model": name, "model_label": label, "task": task, "classes": classes, "setting": setting,
                       "file": str(rel(comp))}
                rows.append(row)
                if run(["disassemble", rel(model_file), "--profile", rel(profile_file), "--classes", classes,
                        *extra, "--out", rel(comp)], f"disassemble-{comp.stem}",
                       f"disassemble {label} {TASK_LABELS[task]} ({setting})") is None:
                    row["error"] = "disassemble"
                    continue
                row["seconds"] = time.monotonic() - started
                e = parse_json(run(["eval", rel(comp), "--against", rel(model_file), "--json"], f"eval-{comp.stem}",
                                   f"evaluate {comp.name}"))
                info = parse_json(run(["info", rel(comp), "--json"], f"info-{comp.stem}", f"read {comp.name}"))
                if not e:
                    row["error"] = "eval"
                    continue
                row["eval"] = e
                row["thresholds"] = (info or {}).get("provenance", {}).get("disassembled")
                if units := (info or {}).get("architecture", {}).get("units"):
                    row["units"] = units
                if row["thresholds"] and setting.startswith("auto"):
                    row["auto"] = row["thresholds"].get("auto")
                log(f"  Base {pct(e['base'])}  RB {pct(e['restricted_base'])}  Disa {pct(e['accuracy'])}  "
                    f"params {e['params'] / e['source_params']:.3f}  FLOPs {e['flops'] / e['source_flops']:.3f}")

    elapsed = time.monotonic() - START
    (out_dir / "results.json").write_text(json.dumps(
        {"sources": sources, "rows": rows, "commands": run.commands, "failures": run.failures,
         "elapsed_s": elapsed}, indent=2, default=str))
    block = results_block(rows, sources, elapsed, run.failures, args.block)
    print()
    print(block)
    if not args.no_doc:
        write_doc(args.doc, block, args.block)
        log(f"wrote {args.doc} and {rel(out_dir / 'results.json')}")
    log(f"finished in {elapsed / 60:.1f} min, {len(run.failures)} failed command(s)")
    sys.exit(1 if run.failures else 0)


if __name__ == "__main__":
    main()
