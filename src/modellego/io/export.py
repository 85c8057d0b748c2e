"""Plain models out of modellego files: an ONNX file (torch.onnx), a `torch.export` program (.pt2) and a folder a
model hub takes as it is (model.safetensors, config.json, README.md). Every file is checked before it is written:
the exported model runs on real inputs and must agree with the PyTorch model, or nothing is written."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from modellego.core.modules import MergeOutputs
from modellego.errors import ModellegoError
from modellego.io.atomic import atomic_write, current_umask, probe_folder, remove_stale_temps
from modellego.io.manifest import Manifest
from modellego.io.modelfile import FOLDER_MODEL
from modellego.kinds import ExportInputs

FORMATS = ("onnx", "pt2", "folder")
OPSET = 18                   # the ONNX opset written: torch's exporter's own, which ONNX Runtime ≥ 1.14 runs
MAX_RELATIVE_ERROR = 1e-4    # largest |exported − PyTorch| logit difference, relative to the batch's largest logit
FOLDER_FORMAT = "modellego-folder"
FOLDER_CONFIG = "config.json"
FOLDER_CARD = "README.md"
INSTALL_ONNX = "pip install 'modellego[export]' (onnx, onnxruntime, onnxscript)"


@dataclass(frozen=True)
class Agreement:
    """How an exported model's logits compare with the PyTorch model's on the same inputs."""

    samples: int
    max_relative_error: float
    max_abs_error: float
    argmax_agree: int        # samples whose top class is the same
    ties: int                # samples that differ only where PyTorch's top two are within the error of each other

    @property
    def argmax_equal(self) -> bool:
        return self.argmax_agree + self.ties == self.samples

    def problem(self) -> str | None:
        """Why the exported model is not the PyTorch model, or None."""
        if not self.argmax_equal:
            return (f"its top class differs from PyTorch's on {self.samples - self.argmax_agree - self.ties} of "
                    f"{self.samples} inputs")
        if not self.max_relative_error <= MAX_RELATIVE_ERROR:
            return (f"its logits differ from PyTorch's by {self.max_relative_error:.2g} (relative), above "
                    f"{MAX_RELATIVE_ERROR:g}")
        return None


def agreement(reference: torch.Tensor, exported: torch.Tensor) -> Agreement:
    """Compare logits row by row: the largest difference (absolute, and relative to the largest |logit|), and
    whether each row's argmax is the same; in an export within the tolerance, a different argmax where PyTorch's
    top two are closer than twice the largest difference is a tie the arithmetic cannot decide."""
    reference, exported = reference.double(), exported.double()
    if reference.shape != exported.shape:
        raise ModellegoError(f"the exported model answers shape {list(exported.shape)}, PyTorch's "
                             f"{list(reference.shape)}")
    same = (reference == exported) | (torch.isnan(reference) & torch.isnan(exported))
    difference = torch.where(same, torch.zeros_like(reference), (reference - exported).abs())
    difference = torch.nan_to_num(difference, nan=float("inf"))
    largest = float(difference.max()) if difference.numel() else 0.0
    finite = reference[torch.isfinite(reference)]
    scale = max(float(finite.abs().max()) if finite.numel() else 0.0, 1e-12)
    agree = reference.argmax(1) == exported.argmax(1)
    top = reference.topk(min(2, reference.shape[1]), dim=1).values
    margin = top[:, 0] - top[:, -1] if top.shape[1] > 1 else torch.full_like(top[:, 0], float("inf"))
    close = largest / scale <= MAX_RELATIVE_ERROR  # only an export within the tolerance can have ties
    ties = int((~agree & (margin <= 2 * largest)).sum()) if close else 0
    return Agreement(reference.shape[0], largest / scale, largest, int(agree.sum()), ties)


# --- making a model traceable ----------------------------------------------------------------------------------

class StaticMerge(MergeOutputs):
    """MergeOutputs with its number of classes read once, as a plain integer: an exported graph's output shape
    cannot depend on a buffer's values (MergeOutputs reads `targets.max()` on every call)."""

    def __init__(self, targets: torch.Tensor) -> None:
        super().__init__(targets.tolist())
        self.classes = int(targets.max()) + 1

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return self.merged(logits, self.classes)


def traceable(model: nn.Module) -> nn.Module:
    """`model` (changed in place) with every MergeOutputs replaced by its StaticMerge: the same function."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is MergeOutputs:
                setattr(parent, name, StaticMerge(child.targets))
    return model


# --- one line for what failed ------------------------------------------------------------------------------------

@contextlib.contextmanager
def _module_trail(model: nn.Module) -> Iterator[list[str]]:
    """The names of the modules entered and not yet left while the block runs (its innermost last)."""
    trail: list[str] = []
    handles = []
    for name, module in model.named_modules():
        def enter(module: nn.Module, args: tuple, name: str = name) -> None:
            trail.append(name)

        def leave(module: nn.Module, args: tuple, output: Any, name: str = name) -> None:
            if trail and trail[-1] == name:
                trail.pop()
        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        yield trail
    finally:
        for handle in handles:
            handle.remove()


def _first_line(error: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    return (text.splitlines() or [type(error).__name__])[0][:300]


def _operator(error: BaseException) -> str | None:
    """The operator an exporter names in its error or its causes (e.g. aten._cdist_forward)."""
    while error is not None:
        found = re.search(r"target=torch\.ops\.([\w.]+)|op='([\w.:]+)'", str(error))
        if found:
            return (found.group(1) or found.group(2)).removesuffix(".default")
        error = error.__cause__ or error.__context__
    return None


def _module_of(program: Any, operator: str) -> str | None:
    """The module whose forward pass called `operator` in an exported program (its nn_module_stack)."""
    for node in program.graph.nodes:
        if node.op == "call_function" and operator.split(".")[-1] in str(node.target):
            stack = node.meta.get("nn_module_stack") or {}
            if stack:
                path, kind = list(stack.values())[-1]
                return f"{path or 'the model'} ({str(kind).rpartition('.')[2]})"
    return None


def torch_program(model: nn.Module, inputs: ExportInputs, what: str) -> Any:
    """`torch.export`'s program of `model` on `inputs`, their dynamic dimensions kept dynamic; a model that does
    not trace is one line naming the module that failed (the innermost one running)."""
    dynamic = tuple({dim: torch.export.Dim(name) for dim, name in dims.items()} for dims in inputs.dynamic)
    with _module_trail(model) as trail:
        try:
            return torch.export.export(model, inputs.tensors, dynamic_shapes=dynamic, strict=False)
        except Exception as error:  # torch.export raises many types; each is the same answer to the user
            where = trail[-1] if trail else ""
            module = dict(model.named_modules()).get(where, model)
            raise ModellegoError(f"{what} does not export with torch.export: module {where or 'the model'} "
                                 f"({type(module).__name__}) failed: {_first_line(error)}") from None


# --- the formats -------------------------------------------------------------------------------------------------

def onnx_modules() -> tuple[Any, Any]:
    """The onnx and onnxruntime modules, or one line saying how to install them."""
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError as error:
        raise ModellegoError(f"--format onnx needs the optional packages onnx, onnxruntime and onnxscript "
                             f"({error.name} is missing): {INSTALL_ONNX}") from None
    return onnx, onnxruntime


def _written(target: Path, write: Callable[[Path], Agreement]) -> Agreement:
    """Write `target` atomically through `write(temp)`, which also checks the temporary file and returns the
    agreement: a check that fails leaves nothing behind."""
    result: list[Agreement] = []
    atomic_write(target, lambda temp: result.append(write(Path(temp))))
    return result[0]


def _refuse(agreement: Agreement, what: str, form: str) -> None:
    problem = agreement.problem()
    if problem:
        raise ModellegoError(f"the {form} export of {what} does not match the PyTorch model ({problem}); nothing "
                             "was written")


def write_pt2(model: nn.Module, inputs: ExportInputs, reference: torch.Tensor, out: Path, what: str) -> Agreement:
    """Save `torch.export`'s program (torch.export.save), loaded back from the very bytes written and run on
    `inputs` before it takes `out`'s name."""
    program = torch_program(model, inputs, what)
    program.example_inputs = None  # torch.export.save would store the check's images in the file
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    data = buffer.getvalue()
    try:
        with torch.no_grad():
            exported = torch.export.load(io.BytesIO(data)).module()(*inputs.tensors)
    except Exception as error:  # torch's loader and the program raise many types; the user gets one line
        raise ModellegoError(f"the pt2 export of {what} could not be loaded back and run ({_first_line(error)}); "
                             "nothing was written") from None
    result = agreement(reference, exported)
    _refuse(result, what, "pt2")
    return _written(out, lambda temp: (temp.write_bytes(data), result)[1])


def write_onnx(model: nn.Module, inputs: ExportInputs, reference: torch.Tensor, out: Path, what: str,
               metadata: dict[str, str]) -> Agreement:
    """Save the ONNX graph of `model` (opset OPSET; `metadata` in its metadata_props, dynamic dimensions named),
    run by ONNX Runtime on the CPU from the written bytes before it takes `out`'s name."""
    onnx, onnxruntime = onnx_modules()
    program = torch_program(model, inputs, what)
    try:
        exported = torch.onnx.export(program, inputs.tensors, dynamo=True, opset_version=OPSET,
                                     input_names=list(inputs.names), output_names=["logits"], verbose=False,
                                     external_data=False)
        proto = exported.model_proto
    except Exception as error:  # the exporter's errors are of many types; each is one line to the user
        operator = _operator(error)
        where = _module_of(program, operator) if operator else None
        raise ModellegoError(f"{what} does not export to ONNX (opset {OPSET}): "
                             + (f"operator {operator}" + (f" in module {where}" if where else "") + " has no ONNX "
                                "translation" if operator else _first_line(error))) from None
    _name_dynamic_dimensions(proto, inputs)
    onnx.helper.set_model_props(proto, metadata)
    if proto.ByteSize() >= 2**31:  # before serialising: protobuf refuses a message that large
        raise ModellegoError(f"{what} is over 2 GiB as ONNX, beyond one protobuf file; use --format pt2 or folder")
    data = proto.SerializeToString()

    def write(temp: Path) -> Agreement:
        temp.write_bytes(data)
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        feeds = {name: tensor.numpy() for name, tensor in zip(inputs.names, inputs.tensors)}
        try:
            session = onnxruntime.InferenceSession(str(temp), options, providers=["CPUExecutionProvider"])
            logits = session.run(["logits"], feeds)[0]
        except Exception as error:  # onnxruntime's own exception types; the user gets one line
            raise ModellegoError(f"ONNX Runtime could not run the ONNX export of {what} ({_first_line(error)}); "
                                 "nothing was written") from None
        result = agreement(reference, torch.from_numpy(logits))
        _refuse(result, what, "ONNX")
        return result
    return _written(out, write)


def _name_dynamic_dimensions(proto: Any, inputs: ExportInputs) -> None:
    """Give the dynamic dimensions the names of `inputs.dynamic` (batch, nodes, ...) instead of the tracer's
    symbols, everywhere in the graph."""
    names: dict[str, str] = {}
    for value, dims in zip(proto.graph.input, inputs.dynamic):
        for dim, name in dims.items():
            symbol = value.type.tensor_type.shape.dim[dim].dim_param
            if symbol:
                names[symbol] = name
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in names:
                dim.dim_param = names[dim.dim_param]


def onnx_metadata(manifest: Manifest, version: str) -> dict[str, str]:
    """What an ONNX file says about its model in metadata_props: the class names (JSON list, output order), the
    input it takes and the whole manifest (lineage, metrics)."""
    return {"classes": json.dumps(manifest.class_names), "input": json.dumps(input_record(manifest)),
            "producer": f"modellego {version}", "modellego.manifest": manifest.to_json()}


def input_record(manifest: Manifest) -> dict[str, Any]:
    """The input an exported model takes, for people and programs that never saw modellego."""
    record = {**manifest.input.to_dict()}
    if "mean" in record:
        record["pixels"] = "float32 in [0, 1], NCHW; the normalisation by mean/std is inside the model"
    return record


# --- the folder ------------------------------------------------------------------------------------------------

def folder_config(manifest: Manifest, version: str) -> dict[str, Any]:
    """config.json: architecture, classes and input, and what wrote it."""
    return {"format": FOLDER_FORMAT, "modellego_version": version, "model_file": FOLDER_MODEL,
            "kind": manifest.kind, "architecture": manifest.architecture, "classes": manifest.class_names,
            "class_sources": [{"name": ref.name, "dataset": ref.dataset, "index": ref.index}
                              for ref in manifest.classes],
            "num_classes": len(manifest.classes), "input": input_record(manifest)}


def is_export_folder(folder: Path) -> bool:
    """Whether `folder` holds a previous `export --format folder` (its config.json says so)."""
    try:
        return json.loads((folder / FOLDER_CONFIG).read_text()).get("format") == FOLDER_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_folder_output(out: Path) -> None:
    """Refuse, before any work, a folder output that exists and is not a previous export (its files would mix
    with ours), or whose parent cannot take it."""
    if out.exists() and not out.is_dir():
        raise ModellegoError(f"--out {out} is a file; --format folder writes a folder")
    if out.is_dir() and any(out.iterdir()) and not is_export_folder(out):
        raise ModellegoError(f"--out {out} is a folder that holds other files; give a new or empty folder (a "
                             "previous export is replaced)")
    parent = out.absolute().parent
    if not parent.is_dir():
        raise ModellegoError(f"output folder {parent} does not exist; create it first (mkdir -p {parent})")
    probe_folder(parent)


def write_folder(model_file: Path, manifest: Manifest, out: Path, version: str) -> Path:
    """Write the folder next to `out` under a temporary name and rename it into place (a previous export there
    is replaced whole), so `out` is never half-written."""
    check_folder_output(out)
    out = out.absolute()
    remove_stale_temps(out)
    temp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}-", suffix=".tmp", dir=out.parent))
    try:
        shutil.copyfile(model_file, temp / FOLDER_MODEL)
        (temp / FOLDER_CONFIG).write_text(json.dumps(folder_config(manifest, version), indent=2) + "\n")
        (temp / FOLDER_CARD).write_text(model_card(manifest, version))
        os.chmod(temp, 0o777 & ~current_umask())
        if out.is_dir():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}-", suffix=".tmp", dir=out.parent))
            os.replace(out, old / "previous")
            os.replace(temp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temp, out)
    except OSError as error:
        raise ModellegoError(f"cannot write {out} ({error.strerror or error})") from None
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return out


def _lineage(provenance: Any, depth: int = 0) -> list[str]:
    """The model card's lineage, one bullet per step, a model's sources indented under it."""
    if not isinstance(provenance, dict):
        return []
    indent = "  " * depth
    lines = []
    assembled = provenance.get("assembled")
    if isinstance(assembled, dict):
        parts = [part for part in assembled.get("components") or [] if isinstance(part, dict)]
        lines.append(f"{indent}- **Assembled** from {len(parts)} components, `{assembled.get('mode')}` mode, "
                     f"calibration `{assembled.get('calibration')}` (logits scaled: {assembled.get('scaled')})")
        for position, part in enumerate(parts):
            lines.append(f"{indent}  - component {position}: classes {', '.join(map(str, part.get('classes', [])))}"
                         f"{_figures(part.get('metrics'))}, weights hash `{str(part.get('hash', ''))[:16]}`")
            lines += _lineage(part.get("provenance"), depth + 2)
    cut = provenance.get("disassembled")
    if isinstance(cut, dict):
        rebuilt = cut.get("reconstruction")
        refit = (f"re-fitted in closed form on {rebuilt.get('images')} images (ridge {rebuilt.get('ridge')})"
                 if isinstance(rebuilt, dict) else "not re-fitted (the paper's pure method)")
        lines.append(f"{indent}- **Disassembled** for the task {', '.join(map(str, cut.get('task', [])))}: α/β conv "
                     f"{cut.get('alpha_conv')}/{cut.get('beta_conv')}, linear {cut.get('alpha_fc')}/"
                     f"{cut.get('beta_fc')}{' (chosen by --auto)' if cut.get('auto') else ''}; {refit}; from the "
                     f"source with weights hash `{str(cut.get('source_hash', ''))[:16]}`")
        lines += _lineage(cut.get("source_provenance"), depth + 1)
    trained = provenance.get("trained")
    if isinstance(trained, dict):
        lines.append(f"{indent}- **Trained** on {trained.get('dataset')} for {trained.get('epochs')} epochs "
                     f"({trained.get('samples')} samples, seed {trained.get('seed')})")
    imported = provenance.get("imported")
    if isinstance(imported, dict):
        lines.append(f"{indent}- **Imported**: {imported.get('builder')} with the weights {imported.get('weights')} "
                     f"(sha256 `{str(imported.get('weights_sha256', ''))[:16]}`)")
    for run in provenance.get("finetuned") or []:
        if isinstance(run, dict):
            lines.append(f"{indent}- **Fine-tuned** for {run.get('epochs')} epochs on {run.get('samples')} samples")
    return lines


def _figures(metrics: Any) -> str:
    if not isinstance(metrics, dict):
        return ""
    shown = [f"{key} {metrics[key]:,}" for key in ("params", "flops") if isinstance(metrics.get(key), int)]
    return f" ({', '.join(shown)})" if shown else ""


def _metrics(manifest: Manifest) -> list[str]:
    shown = {key: value for key, value in manifest.metrics.items() if isinstance(value, (int, float, str))}
    if not shown:
        return ["(none recorded)"]
    return [f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |"
            for key, value in sorted(shown.items())]


def model_card(manifest: Manifest, version: str) -> str:
    """README.md: a model card with the front matter model hubs read, the classes, the input, the lineage, the
    recorded metrics and how to load the model."""
    record = input_record(manifest)
    classes = ", ".join(f"`{name}`" for name in manifest.class_names[:50])
    more = f" … ({len(manifest.classes)} in all)" if len(manifest.classes) > 50 else ""
    metrics = _metrics(manifest)
    table = ["| metric | value |", "| --- | --- |", *metrics] if metrics[0].startswith("|") else metrics
    return "\n".join([
        "---", "library_name: modellego", "tags:", "- model-lego", f"- {manifest.kind}",
        f"datasets: {json.dumps(manifest.datasets)}", "---", "",
        f"# {manifest.architecture.get('builder')} {manifest.kind} for {len(manifest.classes)} classes", "",
        f"A modellego {manifest.kind} (Model LEGO: classifiers disassembled and assembled without training).", "",
        f"**Classes** (output order): {classes}{more}", "",
        f"**Input**: {json.dumps(record)}", "",
        "## Lineage", "", *(_lineage(manifest.provenance) or ["- (none recorded)"]), "",
        "## Recorded metrics", "", *table, "",
        "## How to load it", "",
        f"The weights and the manifest are one safetensors file, `{FOLDER_MODEL}`; `{FOLDER_CONFIG}` repeats the "
        "architecture, classes and input for tools that do not read the manifest. With modellego "
        f"(`pip install modellego`, version {version} or later; it needs torch and torchvision):", "",
        "```python", "import modellego", "", "model, manifest = modellego.load(\"THIS_FOLDER\")  # in eval mode",
        ("logits = model(images)  # images: float32 in [0, 1], N×C×H×W; the model normalises them itself"
         if "mean" in record else "logits = model(x, edge_index)  # a graph: node features N×F, edges 2×E"),
        "```", "",
        "or `modellego eval THIS_FOLDER`. For a runtime without modellego, `modellego export THIS_FOLDER --format "
        "onnx --out model.onnx` (or `--format pt2`).", ""])
