"""Exports measured (issue 28): components of LeNet-5, VGG-16 ×0.25 and ResNet-18 ×0.25 (Fashion-MNIST, 28×28) and
of torchvision's densenet121 and mobilenet_v3_small (four Fashion-MNIST classes as 64×64 RGB PNG files), and a
padded and a parallel LeNet-5 assembly with the default calibration, each exported as ONNX and pt2 by
`modellego.export`: the check's max relative logit error and argmax agreement on the test images, file sizes, and
ONNX Runtime's CPU latency per image against PyTorch's on the same images in the same run (batch 1 and 64).
Every source is trained briefly here (few epochs, a slice of the training split); nothing is downloaded.

    python benchmarks/export.py [--out-dir runs/export] [--doc docs/export.md] [--samples 256]

Writes its table between `<!-- export:begin -->` and `<!-- export:end -->` of --doc.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime
import torch

import modellego
from modellego import commands
from modellego.data.task import DataOptions
from modellego.kinds import kind_of
from torchvision_chain import write_imagefolder

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- export:begin -->", "<!-- export:end -->"
THREADS = 1  # on a shared 2-core machine two threads wait on each other at every operator (≈125 ms per LeNet image)
START = time.monotonic()


def log(text: str) -> None:
    print(f"[{time.monotonic() - START:6.0f} s] {text}", flush=True)


def sources(out: Path, folder: Path) -> list[tuple[str, Path, str, DataOptions | None]]:
    """Train each source briefly: (row name, file, task of its component, data options)."""
    fashion = [("LeNet-5", "lenet5", 1.0, 3, 1000), ("VGG-16 ×0.25", "vgg16", 0.25, 2, 500),
               ("ResNet-18 ×0.25", "resnet18", 0.25, 2, 500)]
    images = DataOptions(folder, 64)
    rows = []
    for name, builder, width, epochs, per_class in fashion:
        path = out / f"{builder}.safetensors"
        if not path.exists():
            commands.train(builder, "fashion-mnist", path, epochs=epochs, width=width, max_per_class=per_class,
                           lr=3e-3, progress=False)
        rows.append((name, path, "Trouser,Bag", None))
    for builder in ("densenet121", "mobilenet_v3_small"):
        path = out / f"{builder}.safetensors"
        if not path.exists():
            commands.train(f"torchvision:{builder}", "imagefolder", path, epochs=3, batch_size=16, data=images,
                           progress=False)
        rows.append((f"torchvision {builder}", path, "Trouser,Bag", images))
    return rows


def component(source: Path, task: str, out: Path, data: DataOptions | None, reconstruct: bool = True) -> Path:
    profile = source.with_suffix(".profile.safetensors")
    if not profile.exists():
        commands.profile(source, profile, samples_per_class=20, data=data, progress=False)
    path = out / f"{source.stem}-{task.replace(',', '-').replace(' ', '_')}.safetensors"
    if not path.exists():
        commands.disassemble(source, profile, task, path, data=data, progress=False, reconstruct=reconstruct)
    return path


def per_image_ms(run, images: torch.Tensor, batch: int, repeats: int) -> float:
    """Median wall time of `run(batch of images)` over `repeats` calls (after one warm-up), per image."""
    chunk = images[:batch]
    run(chunk)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run(chunk)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times) / len(chunk)


def measure(name: str, path: Path, out: Path, samples: int, data: DataOptions | None) -> dict:
    row = {"name": name, "file": path.stat().st_size}
    for form in ("onnx", "pt2"):
        target = out / f"{path.stem}.{form}"
        target.unlink(missing_ok=True)
        result = modellego.export(path, target, form, samples=samples, data=data)
        row[form] = result
    brick = modellego.load(path)
    kind = kind_of(brick.manifest.architecture)
    images = kind.export_inputs(kind.data(brick.manifest, "test", data), 64).tensors[0]
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = THREADS
    session = onnxruntime.InferenceSession(str(out / f"{path.stem}.onnx"), options,
                                           providers=["CPUExecutionProvider"])
    model = brick.model.eval()

    def pytorch(batch: torch.Tensor) -> None:
        with torch.no_grad():
            model(batch)

    def runtime(batch: torch.Tensor) -> None:
        session.run(["logits"], {"images": np.ascontiguousarray(batch.numpy())})

    for batch, repeats in ((1, 50), (64, 5)):
        row[f"torch{batch}"] = per_image_ms(pytorch, images, batch, repeats)
        row[f"ort{batch}"] = per_image_ms(runtime, images, batch, repeats)
    log(f"{name}: ONNX {row['onnx'].agreement.max_relative_error:.1e}, pt2 {row['pt2'].agreement.max_relative_error:.1e}, "
        f"ORT/PyTorch batch 1 {row['ort1'] / row['torch1']:.2f}, batch 64 {row['ort64'] / row['torch64']:.2f}")
    return row


def size(count: int) -> str:
    return f"{count / 1e6:.2f} MB" if count >= 1e5 else f"{count / 1e3:.0f} kB"


def table(rows: list[dict], samples: int, seconds: float) -> str:
    lines = [BEGIN, "",
             f"Measured by `python benchmarks/export.py` on a shared 2-core CPU (torch "
             f"{torch.__version__.split('+')[0]}, ONNX Runtime {onnxruntime.__version__}, ONNX opset "
             f"{rows[0]['onnx'].opset}), {seconds / 60:.0f} minutes in all. Error and agreement: the export's own "
             f"check, on up to {samples} test images spread over the test split. Latency: the median of 50 calls at "
             f"batch 1 and of 5 at batch 64, per image, ONNX Runtime (CPU provider) and PyTorch eager, both on {THREADS} "
             "thread, on the same images in the same process; a ratio below 1 means ONNX Runtime is faster.", "",
             "| model | ONNX max rel. error | ONNX argmax | pt2 max rel. error | pt2 argmax | model file | ONNX | "
             "pt2 | PyTorch ms/img (b1) | ORT ms/img (b1) | ORT/PyTorch b1 | ORT/PyTorch b64 |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        onnx_check, pt2_check = row["onnx"].agreement, row["pt2"].agreement
        lines.append(
            f"| {row['name']} | {onnx_check.max_relative_error:.1e} | {onnx_check.argmax_agree}/{onnx_check.samples} "
            f"| {pt2_check.max_relative_error:.1e} | {pt2_check.argmax_agree}/{pt2_check.samples} | "
            f"{size(row['file'])} | {size(row['onnx'].bytes)} | {size(row['pt2'].bytes)} | {row['torch1']:.3f} | "
            f"{row['ort1']:.3f} | {row['ort1'] / row['torch1']:.2f} | {row['ort64'] / row['torch64']:.2f} |")
    lines += ["", END]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "export")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "export.md")
    parser.add_argument("--samples", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    warnings.simplefilter("ignore")
    out = args.out_dir
    folder = out / "imagefolder"
    out.mkdir(parents=True, exist_ok=True)
    if not (folder / "test").exists():
        write_imagefolder(folder)
    rows = []
    trained = sources(out, folder)
    for name, path, task, data in trained:
        log(f"{name}: component {task}")
        part = component(path, task, out, data, reconstruct=data is None)
        rows.append(measure(f"{name} component {{{task}}}", part, out, args.samples, data))
    lenet = trained[0][1]
    members = [component(lenet, "Trouser,Bag", out, None), component(lenet, "Sandal,Sneaker,Ankle boot", out, None)]
    for mode in ("padded", "parallel"):
        path = out / f"lenet-{mode}.safetensors"
        if not path.exists():
            commands.assemble(members, path, mode=mode, progress=False)
        calibration = modellego.read_manifest(path).provenance["assembled"]["calibration"]
        rows.append(measure(f"LeNet-5 {mode} assembly (5 classes, auto → {calibration})", path, out, args.samples,
                            None))
    section = table(rows, args.samples, time.monotonic() - START)
    print(section)
    text = args.doc.read_text() if args.doc.exists() else "# Export\n\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    args.doc.write_text(text)
    log(f"wrote {args.doc}")


if __name__ == "__main__":
    main()
