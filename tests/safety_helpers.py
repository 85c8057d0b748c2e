"""Real small files and hostile variants of them, shared by tests/test_safety.py and benchmarks/fuzz_files.py."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from modellego.modelfile import save, weights_hash
from helpers import random_classifier
from modellego.layers import parameter_layers
from modellego.profiles import Profile



def small_model(seed: int = 0, classes: int = 4):
    """A LeNet-5 with random weights and its manifest."""
    return random_classifier("lenet5", 1.0, classes, seed=seed, metrics={"test_accuracy": 0.5})


def small_profile(model) -> Profile:
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


def read_with(reader: str, path: Path) -> str:
    """Run one file reader on `path`; returns 'loaded' or 'refused: <message>' (other exceptions propagate)."""
    from modellego.errors import ModellegoError
    from modellego.modelfile import load, read_manifest

    try:
        if reader == "load":
            load(path)
        elif reader == "read_manifest":
            read_manifest(path)
        else:
            Profile.load(path)
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
    import os
    import subprocess
    import sys

    script = f"""
import json, resource, sys, time
sys.path.insert(0, {str(Path(__file__).parent)!r})
import safety_helpers, modellego.modelfile, modellego.profiles, torchvision
size = int(open('/proc/self/status').read().split('VmSize:')[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + int({address_space_gb} * 2**30), resource.RLIM_INFINITY))
for reader, path in {[(reader, str(path)) for reader, path in cases]!r}:
    started = time.perf_counter()
    try:
        outcome = safety_helpers.read_with(reader, path)
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
