"""Re-fitting without gradients: a component's Conv2d/Linear layers re-fitted, in execution order, by ridge least
squares so that each reproduces its source's pre-activation outputs on the task's images, and BatchNorm
re-estimation, which makes running statistics match the weights a model ends up with (DESIGN.md, "Beyond the
paper")."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from modellego import distributed, runtime
from modellego.core.layers import execution_order, parameter_layers
from modellego.core.thresholds import RIDGE  # noqa: F401  (re-exported: the re-fit's default)
from modellego.errors import ModellegoError
from modellego.memory import fit_inference, sample_shape_of
from modellego.progress import track

METHOD = "layerwise-ridge"


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm layers that keep running statistics."""
    return [module for module in model.modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats]


BATCHNORM_BATCH = 256  # re-estimation is inference: its batch size is planned for memory, not training's
IN_MEMORY = 1 << 26    # images up to this many values in all are held as one tensor while the passes read them


def in_memory(images: Dataset, shape: tuple[int, ...] | None) -> torch.Tensor | Dataset:
    """A dataset's images (of `shape`) as one tensor when they hold at most IN_MEMORY values in all, for loops
    that read them several times (decoded by the `runtime`'s workers); else the dataset itself."""
    if shape is None or len(images) * math.prod(shape) > IN_MEMORY:
        return images
    if len(images) == 0:
        return torch.zeros(0, *shape)
    return torch.cat([batch[0] for batch in runtime.loader(images, batch_size=64, shuffle=False)])


class Moments:
    """Per-channel count, sum and sum of squares of a BatchNorm layer's inputs about a fixed `shift` (a guess of
    the mean, which keeps the float64 sums accurate; by default the first batch's mean), over every position of
    every image: plain sums, so the result does not depend on how the images were batched, and shards add up
    (`all_reduce`, with the same shift in every process)."""

    def __init__(self, channels: int, shift: torch.Tensor | None = None) -> None:
        self.shift = shift.detach().double().cpu().clone() if shift is not None else None
        self.count = torch.zeros(1, dtype=torch.float64)
        self.sum = torch.zeros(channels, dtype=torch.float64)
        self.squares = torch.zeros(channels, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, -1] + [1] * (x.dim() - 2)
        x = x.detach()
        if self.shift is None:  # no guess given: the first batch's mean
            self.shift = x.mean(dims).double().cpu()
        centred = x - self.shift.to(x).view(shape)
        self.count += x.numel() // x.shape[1]
        self.sum += centred.sum(dims).double().cpu()
        self.squares += centred.square().sum(dims).double().cpu()

    def all_reduce(self) -> None:
        """Under torchrun: the sums over every process's images (all processes must hold the same shift)."""
        for total in (self.count, self.sum, self.squares):
            distributed.sum_(total)

    @property
    def mean(self) -> torch.Tensor:
        shift = self.shift if self.shift is not None else torch.zeros_like(self.sum)
        return shift + self.sum / self.count.clamp(min=1)

    def variance(self) -> torch.Tensor:
        """The unbiased variance (what BatchNorm keeps as its running variance)."""
        count = self.count.clamp(min=2)
        return ((self.squares - self.sum.square() / count) / (count - 1)).clamp(min=0)


def batchnorm_levels(model: nn.Module, layers: list[nn.Module], example: torch.Tensor) -> list[list[nn.Module]]:
    """`layers` (BatchNorm layers of `model`) grouped by level: a layer's level is 0 when no other of `layers`
    feeds its input, else one more than the highest level among those that do (found on `example`'s autograd
    graph). Each group in execution order; layers that do not run are left out."""
    chosen = {id(layer): layer for layer in layers}
    produced: dict[object, int] = {}  # the autograd node of a layer's output → the layer's id
    reads: dict[int, object] = {}     # a layer's id → the autograd node of its input
    order: list[int] = []

    def before(layer: nn.Module, args: tuple) -> None:
        if id(layer) not in reads:
            order.append(id(layer))
            reads[id(layer)] = args[0].grad_fn

    def after(layer: nn.Module, args: tuple, output: torch.Tensor) -> None:
        produced[output.grad_fn] = id(layer)

    handles = [layer.register_forward_pre_hook(before) for layer in layers]
    handles += [layer.register_forward_hook(after) for layer in layers]
    try:
        with torch.enable_grad():
            model(example.detach().clone().requires_grad_(True))
    finally:
        for handle in handles:
            handle.remove()
    upstream: dict[object, frozenset[int]] = {}

    def feeding(node) -> frozenset[int]:
        """The ids of `layers` whose outputs reach autograd node `node` (iterative: graphs can be deep)."""
        stack = [(node, False)]
        while stack:
            current, expanded = stack.pop()
            if current is None or current in upstream:
                continue
            parents = [parent for parent, _ in current.next_functions if parent is not None]
            if not expanded:
                stack.append((current, True))
                stack.extend((parent, False) for parent in parents if parent not in upstream)
                continue
            found: set[int] = set()
            for parent in parents:
                found |= upstream.get(parent, frozenset())
                if parent in produced:
                    found.add(produced[parent])
            upstream[current] = frozenset(found)
        return upstream.get(node, frozenset()) if node is not None else frozenset()

    level: dict[int, int] = {}
    for layer_id in order:  # execution order: every layer feeding this one ran before it
        sources = feeding(reads[layer_id]) - {layer_id}
        level[layer_id] = 1 + max((level[source] for source in sources), default=-1)
    groups: list[list[nn.Module]] = [[] for _ in range(1 + max(level.values(), default=-1))]
    for layer_id in order:
        groups[level[layer_id]].append(chosen[layer_id])
    return groups


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, dataset: Dataset | torch.Tensor, samples: int = 4096,
                         batch_size: int = BATCHNORM_BATCH, seed: int = 0, progress: bool = False) -> int:
    """Set every BatchNorm layer's running mean and unbiased variance to those of its inputs over up to
    `samples` images of `dataset` (a labelled dataset or a tensor of images; drawn with `seed`) as the model
    computes them in eval mode; nothing else changes, and every module ends in the mode it was in. Returns the
    number of images used (0 without BN).

    Layer by layer, so that the result does not depend on `batch_size` (an inference batch, lowered to fit
    memory): one pass over the images per level of BatchNorm depth (`batchnorm_levels`), each in eval mode and
    stopped once that level's layers have read their inputs, which every layer before them computes with its
    final statistics. Batch statistics (train-mode BatchNorm) would normalise each batch by itself, and a mean
    of per-batch variances leaves out how the batch means move: at small batches of few classes, that drops
    classes in eval mode."""
    if isinstance(dataset, torch.Tensor):
        dataset = TensorDataset(dataset, torch.zeros(len(dataset)))
    layers = batchnorm_layers(model)
    if not layers or len(dataset) == 0:
        return 0
    count = min(samples, len(dataset))
    if count < 2:
        return 0
    shape = sample_shape_of(dataset)
    if shape is not None:  # a no-grad forward: sized like inference
        batch_size = fit_inference(model, shape, batch_size, "re-estimating BatchNorm statistics", samples=count)
    positions = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count].sort().values
    chosen = in_memory(Subset(dataset, positions.tolist()), shape)  # every pass reads them: decode them once
    if isinstance(chosen, torch.Tensor):
        chosen = TensorDataset(chosen, torch.zeros(count))
    device = runtime.device_of(model)
    loader = runtime.loader(chosen, device, batch_size=batch_size, shuffle=False)
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        example = next(iter(loader))[0][:1].to(device)
        levels = batchnorm_levels(model, layers, example)
        for number, level in enumerate(levels):
            moments = {layer: Moments(layer.num_features) for layer in level}
            last = level[-1]

            def observe(layer: nn.Module, args: tuple) -> None:
                moments[layer].add(args[0])
                if layer is last:
                    raise _Stop

            handles = [layer.register_forward_pre_hook(observe) for layer in level]
            try:
                for images, _ in track(loader, f"re-estimating BatchNorm statistics ({number + 1}/{len(levels)})",
                                       len(loader), progress):
                    try:
                        model(images.to(device))
                    except _Stop:
                        pass
            finally:
                for handle in handles:
                    handle.remove()
            for layer in level:
                layer.running_mean.copy_(moments[layer].mean.to(layer.running_mean))
                layer.running_var.copy_(moments[layer].variance().to(layer.running_var))
    finally:
        for module, training in modes.items():
            module.training = training
    return count


# By default a re-fit reads enough images that every re-fitted layer has at least this many rows (images × its
# output positions) per unknown of its least-squares problem (its design width: inputs per group × kernel + 1).
ROWS_PER_UNKNOWN = 4
RECONSTRUCT_MAX_PER_CLASS = 1000  # ... but at most this many images per class of the task


@torch.no_grad()
def images_to_determine(model: nn.Module, input_shape: tuple[int, ...], rows_per_unknown: int = ROWS_PER_UNKNOWN
                        ) -> int:
    """The fewest images that give every Conv2d/Linear layer of `model` at least `rows_per_unknown` rows per
    unknown of its re-fit: a Linear layer gets one row per image (per position of its middle dims), a conv one per
    output position; its unknowns are its inputs per group × kernel size, plus the offset."""
    needed = [1]

    def hook(layer: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if isinstance(layer, nn.Conv2d):
            unknowns = layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1] + 1
            positions = output.shape[2] * output.shape[3]
        else:
            unknowns = layer.in_features + 1
            positions = math.prod(output.shape[1:-1])
        needed.append(math.ceil(rows_per_unknown * unknowns / max(1, positions)))

    layers = [module for module in model.modules() if isinstance(module, (nn.Conv2d, nn.Linear))]
    handles = [layer.register_forward_hook(hook) for layer in layers]
    was_training = model.training
    try:
        model.eval()(torch.zeros(1, *input_shape, device=runtime.device_of(model)))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return max(needed)


class NormalEquations:
    """XᵀX and XᵀY of a least-squares fit Y ≈ X·W, for G independent groups (a grouped conv's groups), summed
    batch by batch in float64 on the rows' device (a GPU's rows never cross to the CPU): memory is G·d·(d + o)
    whatever the number of rows. `cpu()` brings the sums to the CPU, where they are solved."""

    def __init__(self, groups: int, inputs: int, outputs: int) -> None:
        self.gram = torch.zeros(groups, inputs, inputs, dtype=torch.float64)
        self.cross = torch.zeros(groups, inputs, outputs, dtype=torch.float64)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add rows: `x` is G×n×d, `y` G×n×o."""
        x, y = x.double(), y.double()
        if self.gram.device != x.device:
            self.gram, self.cross = self.gram.to(x.device), self.cross.to(x.device)
        self.gram += x.transpose(1, 2) @ x
        self.cross += x.transpose(1, 2) @ y

    def cpu(self) -> "NormalEquations":
        self.gram, self.cross = self.gram.cpu(), self.cross.cpu()
        return self

    def solve(self, prior: torch.Tensor, ridge: float) -> torch.Tensor:
        """argmin_W ‖XW − Y‖² + λ‖W − prior‖² per group (G×d×o), λ = `ridge` × the mean diagonal of XᵀX: with
        few rows the solution stays near `prior` (the source's weights) instead of being undetermined."""
        scale = self.gram.diagonal(dim1=1, dim2=2).mean(1).clamp(min=1e-12)
        lam = (ridge * scale)[:, None, None]
        eye = torch.eye(self.gram.shape[1], dtype=torch.float64, device=self.gram.device)
        return torch.linalg.solve(self.gram + lam * eye, self.cross + lam * prior.double().to(self.gram.device))


@dataclass
class LayerFit:
    """What to re-fit in one layer: its output rows `rows` and input channels `columns` (None: all), matched to
    the source layer's outputs `source_rows` (one per row re-fitted)."""

    rows: torch.Tensor | None
    columns: torch.Tensor | None
    source_rows: torch.Tensor


@dataclass
class Reconstruction:
    """What `reconstruct` did, for the component's provenance."""

    images: int
    ridge: float
    layers: int
    batchnorm_images: int
    method: str = METHOD

    def record(self) -> dict:
        return {"method": self.method, "images": self.images, "ridge": self.ridge, "layers_refitted": self.layers,
                "batchnorm_reestimated_on": self.batchnorm_images}


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layer of interest has been reached."""


def _run_until(model: nn.Module, layer: nn.Module, images: torch.Tensor, want: str) -> torch.Tensor:
    """`layer`'s input (`want="input"`) or output on `images`, running `model` only as far as needed."""
    captured = []

    def pre(module, args):
        captured.append(args[0])
        raise _Stop

    def post(module, args, output):
        captured.append(output)
        raise _Stop

    handle = layer.register_forward_pre_hook(pre) if want == "input" else layer.register_forward_hook(post)
    try:
        model(images)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not captured:
        raise ModellegoError("a layer to re-fit did not run on the reconstruction images")
    return captured[0]


def _batches(images: torch.Tensor | Dataset, batch_size: int) -> Iterator[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        yield from images.split(batch_size)
    else:
        for batch in runtime.loader(images, batch_size=batch_size, shuffle=False):
            yield batch[0] if isinstance(batch, (list, tuple)) else batch


def _design(layer: nn.Module, x: torch.Tensor, columns: torch.Tensor | None, offset: bool) -> torch.Tensor:
    """The least-squares inputs of `layer` for its input `x`: G×n×d (a conv's unfolded patches per group,
    a Linear's features), with a column of ones for the offset (`offset`)."""
    if columns is not None:
        x = x.index_select(1 if isinstance(layer, nn.Conv2d) else x.dim() - 1, columns.to(x.device))
    if isinstance(layer, nn.Conv2d):
        if layer.padding_mode == "zeros":
            x = F.pad(x, layer._reversed_padding_repeated_twice)
        else:
            x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
        # windows as a strided view (cheaper than F.unfold's copy): B, C, H', W', kh, kw
        windows = x.unfold(2, (kh - 1) * dh + 1, sh).unfold(3, (kw - 1) * dw + 1, sw)[..., ::dh, ::dw]
        batch, channels, out_h, out_w = windows.shape[:4]
        groups = layer.groups
        design = windows.reshape(batch, groups, channels // groups, out_h * out_w, kh * kw).permute(1, 0, 3, 2, 4)
        design = design.reshape(groups, batch * out_h * out_w, channels // groups * kh * kw)
    else:
        design = x.reshape(1, -1, x.shape[-1])
    if offset:
        design = torch.cat([design, design.new_ones(*design.shape[:2], 1)], 2)
    return design


def _targets(layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """A layer's outputs as least-squares targets: G×n×o."""
    if isinstance(layer, nn.Conv2d):
        batch, channels = y.shape[:2]
        groups = layer.groups
        return y.reshape(batch, groups, channels // groups, -1).permute(1, 0, 3, 2).reshape(groups, -1, channels // groups)
    return y.reshape(1, -1, y.shape[-1])


def _weights(layer: nn.Module, fit: LayerFit, offset: bool) -> torch.Tensor:
    """The layer's current weights (and bias, zero without one, when `offset`) as G×d×o, in `_design`'s
    layout."""
    weight = layer.weight.detach()
    if fit.rows is not None:
        weight = weight[fit.rows]
    if fit.columns is not None:
        weight = weight[:, fit.columns]
    groups = layer.groups if isinstance(layer, nn.Conv2d) else 1
    out = weight.shape[0]
    matrix = weight.reshape(groups, out // groups, -1)
    if offset:
        if layer.bias is None:
            bias = matrix.new_zeros(out)
        else:
            bias = layer.bias.detach() if fit.rows is None else layer.bias.detach()[fit.rows]
        matrix = torch.cat([matrix, bias.reshape(groups, out // groups, 1)], 2)
    return matrix.transpose(1, 2)


def _store(layer: nn.Module, fit: LayerFit, solution: torch.Tensor, offset: bool, norm: nn.Module | None) -> None:
    """Write a solution in `_weights`' layout back into the layer's rows and columns. A layer without a bias
    hands its fitted offset to the BatchNorm that reads it (BN(z + b) is BN(z) with its mean lowered by b)."""
    matrix = solution.transpose(1, 2).reshape(-1, solution.shape[1]).to(layer.weight)  # O×d, on its device
    where = fit.rows if fit.rows is not None else slice(None)
    if offset:
        matrix, bias = matrix[:, :-1], matrix[:, -1]
        if layer.bias is not None:
            layer.bias[where] = bias
        else:
            norm.running_mean[where] -= bias.to(norm.running_mean.dtype)
    shape = layer.weight.shape
    rows = fit.rows if fit.rows is not None else torch.arange(shape[0])
    if fit.columns is None:
        layer.weight[rows] = matrix.reshape(len(rows), *shape[1:])
    else:
        layer.weight[rows[:, None], fit.columns] = matrix.reshape(len(rows), len(fit.columns), *shape[2:])


def following_batchnorm(model: nn.Module, example: torch.Tensor) -> dict[str, str]:
    """Per Conv2d/Linear layer, the BatchNorm module that reads its output directly (conv → BN), if any."""
    layers = parameter_layers(model)
    norms = {module: name for name, module in model.named_modules()
             if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats}
    produced: dict[int, str] = {}
    found: dict[str, str] = {}
    alive: list[torch.Tensor] = []  # so that no tensor's id is reused during the trace

    def output_of(name: str):
        def hook(module, args, output) -> None:
            alive.append(output)
            produced[id(output)] = name
        return hook

    def input_of(name: str):
        def hook(module, args) -> None:
            if id(args[0]) in produced:
                found.setdefault(produced[id(args[0])], name)
        return hook

    handles = [module.register_forward_hook(output_of(name)) for name, module in layers.items()]
    handles += [module.register_forward_pre_hook(input_of(name)) for module, name in norms.items()]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return found


def _batchnorm_map(source_norm: nn.Module, norm: nn.Module, source_rows: torch.Tensor, rows: torch.Tensor | None,
                   groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine map y ↦ y·scale + shift (float64, G×1×o like `_weights`' outputs) that takes the source layer's
    outputs (at `source_rows`) to what the model's layer must output for the model's BatchNorm to give what the
    source's BatchNorm gives: (y − μ_s)·σ/σ_s + μ. The identity while the statistics are the source's."""
    source_mean = source_norm.running_mean[source_rows].double().cpu()
    source_std = (source_norm.running_var[source_rows].double().cpu() + source_norm.eps).sqrt()
    mean, variance = norm.running_mean.double().cpu(), norm.running_var.double().cpu()
    if rows is not None:
        mean, variance = mean[rows.cpu()], variance[rows.cpu()]
    scale = (variance + norm.eps).sqrt() / source_std
    shift = mean - source_mean * scale
    return scale.reshape(groups, 1, -1), shift.reshape(groups, 1, -1)


@torch.no_grad()
def reconstruct(model: nn.Module, source: nn.Module, fits: dict[str, LayerFit], images: torch.Tensor | Dataset,
                ridge: float = RIDGE, batch_size: int = 64, batchnorm: bool = True,
                source_outputs: dict[str, list[torch.Tensor]] | None = None, progress: bool = False) -> Reconstruction:
    """Re-fit `model`'s layers named in `fits` (a component of `source`, or `source`'s masked copy) in
    execution order, each by ridge least squares on its inputs as they are now (after the layers before it
    were re-fitted) so that its outputs match `source`'s on `images` (a tensor of images, or a labelled
    dataset): closed form, no gradients. A layer read by a BatchNorm is fitted so that the BatchNorm's output
    matches the source's; with `batchnorm`, that BatchNorm's statistics are first set to those of the layer's
    outputs on the same images (the pass that gathers the layer's inputs measures them, as `Moments`: exact
    and independent of the batch size). `source_outputs` (per layer, the source's outputs per batch) saves
    recomputing them across calls."""
    if not ridge > 0:
        raise ModellegoError(f"the ridge must be positive, got {ridge}")
    count = len(images)
    if count == 0:
        raise ModellegoError("reconstruction needs at least one image")
    model.eval()
    source.eval()
    first = next(_batches(images, batch_size))
    device = next(model.parameters()).device
    layers, source_layers = parameter_layers(model), parameter_layers(source)
    norms = following_batchnorm(model, first[:1].to(device))
    modules = dict(model.named_modules())
    source_modules = dict(source.named_modules())
    order = [name for name in execution_order(model, first[:1].to(device)) if name in fits]
    refreshed = False
    for name in track(order, "re-fitting layers", len(order), progress):
        layer, fit = layers[name], fits[name]
        rows = fit.rows
        groups = layer.groups if isinstance(layer, nn.Conv2d) else 1
        norm = modules[norms[name]] if name in norms else None
        offset = layer.bias is not None or norm is not None
        prior = _weights(layer, fit, offset)
        equations = NormalEquations(groups, prior.shape[1], prior.shape[2])
        # the BatchNorm's statistics, about its current mean (the same in every process)
        moments = Moments(norm.num_features, norm.running_mean) if batchnorm and norm is not None else None
        for index, batch in enumerate(_batches(images, batch_size)):
            if index % distributed.world_size() != distributed.rank():
                continue  # under torchrun each process adds its share of the batches; the sums are all-reduced
            batch = batch.to(device)
            x = _run_until(model, layer, batch, "input")
            if moments is not None:
                moments.add(layer(x))  # what the BatchNorm reads: the layer's outputs before its re-fit
            y = (source_outputs[name][index].to(device) if source_outputs is not None
                 else _run_until(source, source_layers[name], batch, "output"))
            y = y.index_select(1 if isinstance(layer, nn.Conv2d) else y.dim() - 1, fit.source_rows.to(device))
            equations.add(_design(layer, x, fit.columns, offset), _targets(layer, y))
        distributed.sum_(equations.gram)
        distributed.sum_(equations.cross)
        equations.cpu()  # the BatchNorm map and the solve are small: on the CPU, in float64
        prior = prior.double().cpu()
        if moments is not None:
            moments.all_reduce()
            norm.running_mean.copy_(moments.mean.to(norm.running_mean))
            norm.running_var.copy_(moments.variance().to(norm.running_var))
            refreshed = True
        if norm is not None:  # targets and prior seen through the model's BatchNorm: y·scale + shift
            scale, shift = _batchnorm_map(source_modules[norms[name]], norm, fit.source_rows, rows, groups)
            equations.cross = equations.cross * scale + equations.gram[:, :, -1:] * shift
            prior = prior.double() * scale
            prior[:, -1:] += shift
        _store(layer, fit, equations.solve(prior, ridge), offset, norm)
    return Reconstruction(count, ridge, len(order), count if refreshed else 0)


def changed_layers(cut, order: list[str]) -> list[str]:
    """The layers to re-fit for a cut: from the first one (in execution order) that loses a channel on. The
    layers before it compute exactly what the source computes, so re-fitting them would change nothing."""
    unchanged = cut.unchanged()
    start = next((position for position, name in enumerate(order) if name not in unchanged), len(order))
    return order[start:]


def component_fits(cut, order: list[str]) -> dict[str, LayerFit]:
    """Fits for a physically cut component (`cut` from `disassemble_with_cut` on the source, `order` the
    source's execution order): all rows and inputs of each changed layer, matched to the source rows it kept."""
    return {name: LayerFit(None, None, cut.outputs[name]) for name in changed_layers(cut, order)}


def reconstruct_component(component: nn.Module, source: nn.Module, cut, images: torch.Tensor | Dataset,
                          ridge: float = RIDGE, batch_size: int = 64, batchnorm: bool = True) -> Reconstruction:
    """Reconstruct a component cut out of `source` (`cut` from `disassemble_with_cut`) on `images`: every layer
    from the first one the cut changes on, re-fitted to the source's outputs (see `reconstruct`). Images read
    from files are decoded once, when they fit in memory: every layer's pass reads them again."""
    if not isinstance(images, torch.Tensor) and len(images):
        images = in_memory(images, tuple(images[0][0].shape))
    example = next(_batches(images, batch_size))[:1].to(next(source.parameters()).device)
    return reconstruct(component, source, component_fits(cut, execution_order(source, example)), images, ridge,
                       batch_size, batchnorm)


def source_outputs_by_batch(source: nn.Module, images: torch.Tensor | Dataset, names: Iterable[str],
                            batch_size: int = 64) -> dict[str, list[torch.Tensor]]:
    """The source's outputs of the layers `names` on `images`, per batch (as `reconstruct` batches them), to
    reuse across many reconstructions of the same source (the α/β search)."""
    wanted = set(names)
    layers = {name: layer for name, layer in parameter_layers(source).items() if name in wanted}
    found: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    current: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module, args, output) -> None:
            # a copy (a later in-place activation must not change it), kept on the CPU: every layer's outputs on
            # every image would crowd a GPU; `reconstruct` moves each batch back as it needs it
            current.setdefault(name, output.detach().to("cpu", copy=True))
        return hook

    handles = [layer.register_forward_hook(keep(name)) for name, layer in layers.items()]
    source.eval()
    try:
        with torch.no_grad():
            for batch in _batches(images, batch_size):
                current.clear()
                source(batch.to(next(source.parameters()).device))
                for name in layers:
                    found[name].append(current[name])
    finally:
        for handle in handles:
            handle.remove()
    return found
