"""Hostile files for the file readers (issue 8): small valid model and profile files and their parts, the memory
bombs, the mutations the fuzzers apply, and reading a file in a fresh, memory-limited Python. Shared by
tests/io/test_safety.py and benchmarks/fuzz_files.py; testing support, not the method.

Hypothesis is a test dependency only: the fuzzers' strategies come from `strategies()`, which imports it, so that
importing this module never needs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from modellego.core.hashing import weights_hash
from modellego.core.layers import parameter_layers
from modellego.core.profile import Profile
from modellego.data.spec import InputSpec
from modellego.errors import ModellegoError
from modellego.io.manifest import Brick, ClassRef, Manifest
from modellego.io.modelfile import load, read_manifest, save
from modellego.io.profiles import load_profile
from modellego.models.classifier import classifier

FASHION = InputSpec(1, (28, 28), (0.286,), (0.353,))  # Fashion-MNIST's input, as a trained model records it

# --- small valid files and their parts -------------------------------------------------------------------------


def small_model(seed: int = 0, classes: int = 4) -> Brick:
    """A LeNet-5 with random weights (and BatchNorm statistics, where a model has any), in eval mode, and the
    manifest a trained one would have: classes c0, c1, … of Fashion-MNIST, test accuracy 0.5."""
    torch.manual_seed(seed)
    model = classifier("lenet5", FASHION, classes, 1.0).eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    manifest = Manifest(architecture={"builder": "lenet5", "in_channels": FASHION.channels, "num_classes": classes,
                                      "width": 1.0},
                        classes=[ClassRef(f"c{k}", "fashion-mnist", k) for k in range(classes)], input=FASHION,
                        metrics={"test_accuracy": 0.5})
    return Brick(model, manifest)


def small_profile(model: nn.Module) -> Profile:
    """A profile of `model` with random positive sums (the file format is what matters here)."""
    generator = torch.Generator().manual_seed(0)
    layers = parameter_layers(model)
    sums = {}
    for name, layer in layers.items():
        shape = (4, layer.out_channels, layer.in_channels) if isinstance(layer, torch.nn.Conv2d) \
            else (4, layer.out_features, layer.in_features)
        sums[name] = torch.rand(*shape, generator=generator) + 0.01
    return Profile(contributions=sums, layers=list(layers), classes=[f"c{k}" for k in range(4)],
                   counts=torch.ones(4, dtype=torch.long), samples=torch.arange(4), sample_labels=torch.arange(4),
                   model_hash=weights_hash(model), input_shape=(1, 28, 28), samples_per_class=1)


def write_model(folder: Path, name: str = "model.safetensors", seed: int = 0) -> Path:
    model, manifest = small_model(seed)
    return save(model, folder / name, manifest)


def write_raw(path: Path, tensors: dict, manifest: dict | str, key: str = "modellego") -> Path:
    """A safetensors file holding `tensors` and `manifest` (a dict or raw JSON text) under metadata `key`."""
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    save_file({name: value.contiguous() for name, value in tensors.items()}, str(path), metadata={key: text})
    return path


def model_parts(seed: int = 0) -> tuple[dict, dict]:
    """The tensors and manifest (as a JSON-ready dict) of a small valid model file."""
    model, manifest = small_model(seed)
    return ({key: value.clone() for key, value in model.state_dict().items()}, json.loads(manifest.to_json()))


def profile_parts() -> tuple[dict, dict]:
    """The tensors and header (as a dict) of a small valid profile file."""
    model, _ = small_model()
    result = small_profile(model)
    tensors = {f"A/{name}": value for name, value in result.contributions.items()}
    tensors.update(counts=result.counts, samples=result.samples, sample_labels=result.sample_labels)
    header = {"format": "modellego-profile", "format_version": 1, "layers": result.layers, "classes": result.classes,
              "model_hash": result.model_hash, "dataset": "", "input_shape": [1, 28, 28], "samples_per_class": 1,
              "notes": []}
    return tensors, header


# --- mutations: what the fuzzers change in a valid file ----------------------------------------------------------

MODEL_FIELDS = ["format", "format_version", "kind", "architecture", "architecture.builder", "architecture.num_classes",
                "architecture.width", "architecture.in_channels", "architecture.merge_outputs", "architecture.members",
                "classes", "classes.0", "classes.0.name", "classes.1.index", "classes.2.dataset", "input",
                "input.channels", "input.size", "input.size.0", "input.mean", "input.std", "input.std.0",
                "provenance", "metrics", "metrics.test_accuracy", "layers", "layers.net.features.0"]
PROFILE_FIELDS = ["format", "format_version", "layers", "layers.0", "layers.4", "classes", "classes.0", "model_hash",
                  "input_shape", "input_shape.0", "input_shape.2", "samples_per_class", "notes", "dataset"]
TENSOR_CHANGE_KINDS = ["keep", "shape", "dtype", "drop", "extra", "nan"]
TENSOR_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.float64]


def strategies() -> tuple[Any, Any]:
    """The fuzzers' hypothesis strategies: (JUNK, TENSOR_CHANGES) — junk values for a manifest or header field
    ("DEEP" and "LONG" become deep and long JSON in `json_text`), and changes for `mutate_tensors`."""
    from hypothesis import strategies as st

    junk = st.one_of(
        st.none(), st.booleans(), st.integers(min_value=-10**30, max_value=10**30),
        st.sampled_from([0, -1, 1, 10**6 + 1, 4097, 40_000, 10**12, 10**400, 2**63, -5]),
        st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e9, 17.0, 0.5, 1e-300]),
        st.text(max_size=12), st.sampled_from(["abc", "", "[/bold]", "\x1b[31m", "parallel", "torchvision:vgg16"]),
        st.lists(st.integers(min_value=-3, max_value=5000), max_size=6),
        st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
        st.just("DEEP"), st.just("LONG"),
    )
    tensor_changes = st.tuples(
        st.sampled_from(TENSOR_CHANGE_KINDS),
        st.integers(min_value=0, max_value=100),
        st.lists(st.integers(min_value=0, max_value=7), max_size=4),
        st.sampled_from(TENSOR_DTYPES),
    )
    return junk, tensor_changes


def set_path(data: Any, path: str, value: Any) -> None:
    """Set (or, with value DELETE, remove) a dotted path; a key with dots (layers.net.features.0) stays whole."""
    parts = path.split(".")
    node = data
    while len(parts) > 1:
        head = parts.pop(0)
        if isinstance(node, list):
            node = node[int(head)] if head.isdigit() and int(head) < len(node) else {}
        elif head == "layers" and parts and not isinstance(node.get(head), list):
            node = node.setdefault(head, {})
            parts = [".".join(parts)]
        else:
            node = node.setdefault(head, {}) if isinstance(node, dict) else {}
    key = parts[0]
    if isinstance(node, list):
        if key.isdigit() and int(key) < len(node):
            node[int(key)] = value
    elif isinstance(node, dict):
        if value == "DELETE":
            node.pop(key, None)
        else:
            node[key] = value


def json_text(data: Any) -> str:
    """`data` as JSON, the junk values "DEEP" and "LONG" replaced by 3,000-deep nesting and a 300,001-item list."""
    text = json.dumps(data)
    return text.replace('"DEEP"', "[" * 3000 + "]" * 3000).replace('"LONG"', "[" + "1," * 300_000 + "1]")


def mutate_tensors(tensors: dict, change: tuple) -> dict:
    """A copy of `tensors` with one change (kind, pick, shape, dtype) applied to the tensor `pick` chooses."""
    kind, pick, shape, dtype = change
    tensors = dict(tensors)
    key = sorted(tensors)[pick % len(tensors)]
    if kind == "shape":
        tensors[key] = torch.ones(shape, dtype=tensors[key].dtype)
    elif kind == "dtype":
        tensors[key] = tensors[key].to(dtype)
    elif kind == "drop":
        del tensors[key]
    elif kind == "extra":
        tensors["stray.weight"] = torch.ones(shape or [1])
    elif kind == "nan" and tensors[key].is_floating_point():
        tensors[key] = torch.full_like(tensors[key], float("nan"))
    return tensors


# --- memory bombs ------------------------------------------------------------------------------------------------


def bombs(folder: Path) -> dict[str, tuple[str, Path]]:
    """Small files that ask for gigabytes (the issue's memory bombs): name -> (reader, path)."""
    tensors, manifest = model_parts()
    cases: dict[str, tuple[str, Path]] = {}

    def variant(name: str, change, reader: str = "load", stored: dict | None = None) -> None:
        data = json.loads(json.dumps(manifest))
        change(data)
        cases[name] = (reader, write_raw(folder / f"{name}.safetensors", stored or tensors, data))

    variant("mobilenet_v2 width=50", lambda d: d["architecture"].update(builder="torchvision:mobilenet_v2", width=50))
    variant("mobilenet_v2 width=16", lambda d: d["architecture"].update(builder="torchvision:mobilenet_v2", width=16))
    variant("vgg16 width=8", lambda d: d["architecture"].update(builder="vgg16", width=8))
    variant("parallel of 5,000 members", lambda d: d.update(architecture={
        "builder": "parallel", "num_classes": 4,
        "members": [dict(d["architecture"], input=d["input"]) for _ in range(5000)]}))
    variant("input size 8000x8000", lambda d: d["input"].update(size=[8000, 8000]))
    variant("input size 4096x4096 (allowed)", lambda d: d["input"].update(size=[4096, 4096]))
    merged = dict(tensors, **{"merge.targets": torch.zeros(2_000_000, dtype=torch.long)})
    variant("merge.targets of 2,000,000", lambda d: d["architecture"].update(merge_outputs=True), stored=merged)
    huge = dict(tensors, **{"merge.targets": torch.tensor([0, 1, 2, 2_000_000])})
    variant("merge.targets value 2,000,000", lambda d: d["architecture"].update(merge_outputs=True), stored=huge)
    variant("num_classes 10**12", lambda d: d["architecture"].update(num_classes=10**12))
    variant("nesting 2,000 deep", lambda d: d["provenance"].update(deep="DEEP"))
    text = json.loads(json.dumps(manifest))
    text["provenance"]["deep"] = "DEEP"
    write_raw(folder / "deep.safetensors", tensors, json.dumps(text).replace('"DEEP"', "[" * 2000 + "]" * 2000))
    cases["nesting 2,000 deep"] = ("load", folder / "deep.safetensors")
    big = json.loads(json.dumps(manifest))
    big["provenance"]["notes"] = ["x" * 100] * 800_000
    cases["provenance of 800,000 strings (info)"] = ("read_manifest", write_raw(folder / "big.safetensors", tensors, big))
    profile_tensors, header = profile_parts()
    header["input_shape"] = [1, 6000, 6000]
    cases["profile input_shape 1x6000x6000"] = ("profile", write_raw(folder / "p.safetensors", profile_tensors, header,
                                                                    key="modellego-profile"))
    return cases


# --- reading ------------------------------------------------------------------------------------------------------


def read_with(reader: str, path: Path) -> str:
    """Run one file reader ("load", "read_manifest" or "profile") on `path`; returns 'loaded' or
    'refused: <message>' (other exceptions propagate)."""
    try:
        if reader == "load":
            load(path)
        elif reader == "read_manifest":
            read_manifest(path)
        else:
            load_profile(path)
    except ModellegoError as error:
        return f"refused: {error}"
    return "loaded"


def measure_in_subprocess(reader: str, path: Path, address_space_gb: float = 2.0, timeout: int = 120) -> dict:
    """Read `path` in a fresh Python whose address space may grow by at most `address_space_gb` beyond what
    importing torch takes, so a memory regression fails instead of exhausting the machine. Returns the outcome,
    seconds spent reading and the process's peak RSS in MB (VmHWM)."""
    return measure_all_in_subprocess([(reader, path)], address_space_gb, timeout)[0]


def measure_all_in_subprocess(cases: list[tuple[str, Path]], address_space_gb: float = 2.0,
                              timeout: int = 120) -> list[dict]:
    """`measure_in_subprocess` for several files, one after the other in one fresh Python under the same limit
    (importing torch once instead of once per file); each file's peak RSS is the process's peak so far."""
    script = f"""
import json, resource, sys, time
import modellego.benchmarking.hostile as hostile, modellego.io.modelfile, modellego.core.profile, torchvision
size = int(open('/proc/self/status').read().split('VmSize:')[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + int({address_space_gb} * 2**30), resource.RLIM_INFINITY))
for reader, path in {[(reader, str(path)) for reader, path in cases]!r}:
    started = time.perf_counter()
    try:
        outcome = hostile.read_with(reader, path)
    except MemoryError:
        outcome = 'MemoryError'
    except Exception as error:
        outcome = 'crash: ' + type(error).__name__ + ': ' + str(error)[:200]
    seconds = time.perf_counter() - started
    # VmHWM, not ru_maxrss: a forked child's ru_maxrss starts from its parent's size
    peak = int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) / 1024
    print(json.dumps({{'outcome': outcome, 'seconds': seconds, 'peak_rss_mb': peak}}), flush=True)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout,
                            env=dict(os.environ, PYTHONWARNINGS="ignore"))
    measured = [json.loads(line) for line in result.stdout.strip().splitlines() if line.startswith("{")]
    if result.returncode != 0:  # the case it died on, and those it never reached
        died = {"outcome": f"process died ({result.returncode}): {result.stderr[-300:]}", "seconds": None,
                "peak_rss_mb": None}
        measured += [died] * (len(cases) - len(measured))
    return measured


__all__ = ["FASHION", "MODEL_FIELDS", "PROFILE_FIELDS", "bombs", "json_text", "measure_all_in_subprocess",
           "measure_in_subprocess", "model_parts", "mutate_tensors", "profile_parts", "read_with", "set_path",
           "small_model", "small_profile", "strategies", "write_model", "write_raw"]
