"""What the command answers before torch is imported: `modellego --version`, and `modellego` / `modellego --help`
(the command list). Importing torch takes seconds; these answers take milliseconds. The list is kept equal to
the application's commands and their docstrings by tests/cli/test_cli.py."""

from __future__ import annotations

import os
import shutil
import sys
import textwrap
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _installed

SUMMARY = "Make new classifiers without training: disassemble trained models, assemble components."
OPTIONS = (
    ("--debug", "On an unexpected error, print the full traceback."),
    ("--verbose", "Also print what each loop is estimated to need in memory (before the command or after it: "
                  "`modellego train ... --verbose`)."),
    ("--version", "Print modellego's version and exit."),
    ("--help", "Show this message and exit."),
)
COMMANDS = (
    ("route", "Draw the decision routes of some classes (the channels they keep in every layer) and print a table "
              "of channels kept per class and shared."),
    ("heatmap", "Heat map of one layer's soft relative contribution: classes (rows) × input channels (columns)."),
    ("profile", "Per-class contributions of every parameter layer, on the model's training data."),
    ("disassemble", "Cut a standalone component for some classes out of a model, without training."),
    ("assemble", "Assemble components into one model that answers the union of their classes, without training."),
    ("train", "Train a model from the zoo on a dataset (or some of its classes) and save it."),
    ("eval", "Accuracy overall and per class on the test split, with params and FLOPs."),
    ("finetune", "Train a model (an assembly: its zero blocks too) on the training data of all its classes."),
    ("info", "Show a model file's manifest (architecture, classes, input, provenance, metrics), or what a profile "
             "file holds (the classes, layers, dtype)."),
    ("import", "Bring a pretrained classifier in: a model file from a builder and its weights, no download."),
    ("demo", "The whole job on Fashion-MNIST (digits when absent): train, profile, disassemble two tasks, assemble, "
             "fine-tune."),
    ("export", "Export a model as ONNX, a torch.export program or a model-hub folder, checked against PyTorch "
               "first."),
    ("box", "The box: a catalogue of models, profiles and components to search and build from."),
)


def version() -> str:
    """The installed modellego's version (0+unknown from a source tree never installed)."""
    try:
        return _installed("modellego")
    except PackageNotFoundError:
        return "0+unknown"


def usage() -> str:
    """The top-level help: usage, the global options and every command with its summary."""
    width = max(60, min(120, shutil.get_terminal_size((100, 24)).columns))

    def section(title: str, rows: tuple[tuple[str, str], ...]) -> list[str]:
        left = max(len(name) for name, _ in rows) + 2
        lines = [f"{title}:"]
        for name, text in rows:
            wrapped = textwrap.wrap(text, width - left - 2) or [""]
            lines.append(f"  {name.ljust(left)}{wrapped[0]}")
            lines += [" " * (left + 2) + line for line in wrapped[1:]]
        return lines

    return "\n".join(["Usage: modellego [OPTIONS] COMMAND [ARGS]...", "", SUMMARY, "",
                      *section("Options", OPTIONS), "", *section("Commands", COMMANDS), "",
                      "Run `modellego COMMAND --help` for a command's options."])


def answer(args: list[str]) -> bool:
    """Print the answer to `args` when it needs no torch (the version, the top-level help) and say whether it did."""
    if args == ["--version"]:
        text = f"modellego {version()}"
    elif args in ([], ["--help"]):
        text = usage()
    else:
        return False
    try:
        print(text, flush=True)
    except BrokenPipeError:  # `modellego --help | head`: the reader left, which is fine
        sys.stdout = open(os.devnull, "w")
    return True
