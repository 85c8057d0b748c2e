"""Calibrations that tell an assembly which component an input belongs to, without training.

The paper's parameter scaling (`scale`, in assembly.py) makes components' logits comparable on average; a
component still answers confidently on images of classes it never saw. A *gate* instead scores, for every
input and every component, how typical the input is of that component's own training images, and weighs the
components' answers by it:

    out[j] = log_softmax(logits_c)[j] + log_softmax_c(z / T)       for output j of component c,
    z_c    = (s_c(x) − mean_c) / std_c                             (the score z-scored on c's own images)

so the assembly's answer is "the class the most typical component names" (a mixture of the components'
posteriors with input-dependent weights). Gates (every statistic from one component's own training images of
its own classes, computed without gradients):

- `msp`: s = the component's maximum softmax probability;
- `energy`: s = logsumexp of the component's logits (the negative free energy);
- `mahalanobis`: s = −min_k Mahalanobis distance of the classifier's input features to class k's mean
  (class means and one shared, shrunk covariance);
- `knn`: s = −distance of the L2-normalised classifier-input features to their k-th nearest own image;
- `nearest`: s = −distance of the input image (pooled to at most 32×32, L2-normalised) to its 5th nearest own
  training image. All components measure in the same space (the assembly's input), so the distances are compared
  as they are (divided by a fixed 0.01) instead of z-scored;
- `pattern` (MDA's own): s = max_k mean over layers of the cosine between the input's contribution matrix
  C⁺[o,i] and class k's profile (the mean C⁺ of k's images) — the paper's heat maps show classes have
  distinct patterns, and images of another component's classes match none of them.

A `Gate` module holds the statistics as buffers and reads what it needs (each component's logits, and
features or contributions at its layers) through hooks on the assembled model, so a loaded assembly needs no
data. `Tap`s say where component c's channels sit in the assembled model (padded: rows/columns of the merged
layers; parallel: the member's own layers), so padded and parallel compute the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import BatchSampler, Dataset, SequentialSampler

from modellego import distributed, runtime
from modellego.core.channels import ChannelGraph
from modellego.core.choice import Choice
from modellego.core.contributions import window_sums
from modellego.core.layers import example_batch, execution_order, head, parameter_layers, recorded_inputs
from modellego.core.modules import Parallel
from modellego.errors import ModellegoError


class Calibration(Choice):
    """How an assembly decides between its components: nothing (`none`), the paper's parameter scaling
    (`scale`), a gate, a joint head re-fitted in closed form (`joint`, joint.py), or `auto` (the one that answers
    the components' own held-out training images best)."""

    NONE = "none"
    SCALE = "scale"
    MSP = "msp"
    ENERGY = "energy"
    MAHALANOBIS = "mahalanobis"
    KNN = "knn"
    PATTERN = "pattern"
    NEAREST = "nearest"
    JOINT = "joint"
    AUTO = "auto"

    @property
    def is_gate(self) -> bool:
        return self.value in GATES

    @property
    def stores_samples(self) -> bool:
        """Whether the calibration keeps rows of the components' training images in the file."""
        return self.value in PER_SAMPLE


def stored_rows(calibration: Calibration, stats: Sequence[dict[str, Tensor]] | None) -> dict | None:
    """What a calibration's statistics hold of the training images, for a manifest: None for a data-free one."""
    if not calibration.stores_samples or not stats:
        return None
    rows = [int(own["bank"].shape[0]) for own in stats]
    return {"calibration": calibration.value, "what": STORED_AS[calibration.value], "rows": sum(rows),
            "rows_per_component": rows}


GATES = ("msp", "energy", "mahalanobis", "knn", "pattern", "nearest")
CALIBRATIONS = ("none", "scale", *GATES, "joint")
# Gates whose statistics are rows of the components' own training images (`knn`: each image's normalised
# classifier-input features; `nearest`: each image, pooled): a file holding them holds training data. The others
# keep class-level statistics (means, a shared precision, class profiles) or nothing.
PER_SAMPLE = ("knn", "nearest")
STORED_AS = {"knn": "classifier-input feature rows, one per training image",
             "nearest": "training images average-pooled to at most 32×32, one row per image"}
FEATURE_GATES = ("mahalanobis", "knn")
KNN_NEIGHBOURS = 10
NEAREST_NEIGHBOURS = 5
NEAREST_SIDE = 32         # `nearest` compares images average-pooled to at most 32×32
NEAREST_SCALE = 0.01      # `nearest` distances are comparable across components: divided by this, not z-scored
SHRINKAGE = 0.1           # covariance shrinkage towards its mean variance (Ledoit–Wolf style, fixed)
MIN_VARIANCE = 1e-6       # the covariance's mean variance is at least this, so the precision stays below 1e7
DEFAULT_TEMPERATURE = 1.0
TEMPERATURES = (1e-3, 1e3)  # the gate temperatures a file may hold: the softmax over z / T stays finite
MAX_STATISTIC = 1e8       # a statistic's magnitude in a file: distances and z-scores stay far from float32's range
PATTERN_LAYERS = 3        # the last parameter layers whose contribution patterns the `pattern` gate compares


@dataclass
class Tap:
    """Where component c's part of a parameter layer sits in a model: the layer's module path, the output rows
    that are c's (None: all) and, for each of c's own input positions, its position in the layer's input."""

    layer: str
    rows: Tensor | None = None
    columns: Tensor | None = None


@dataclass
class ComponentTaps:
    """What a gate reads of one component: its raw logits are outputs `start:stop` of the concatenation; its
    classifier input (`features`) and the `pattern` layers."""

    start: int
    stop: int
    features: Tap
    pattern: list[Tap]


# --- the per-component quantities, computed the same way standalone and inside an assembly ------------------

def contribution_block(layer: nn.Module, x: Tensor, rows: Tensor | None, columns: Tensor | None) -> Tensor:
    """C⁺[b, o, i] of `layer` on input `x`, for output rows `rows` and input positions `columns` only (in that
    order; None: all). Exactly the component's own contributions when the rows/columns are its block of a
    padded layer, whose other blocks are zero."""
    with torch.no_grad():
        weight = layer.weight.detach()
        if rows is not None:
            weight = weight.index_select(0, rows)
        if isinstance(layer, nn.Linear):
            if x.dim() > 2:
                x = x.reshape(x.shape[0], -1, x.shape[-1]).sum(1)
            if columns is not None:
                x, weight = x.index_select(1, columns), weight.index_select(1, columns)
            return (weight.unsqueeze(0) * x.unsqueeze(1)).clamp(min=0)
        sums = window_sums(x, layer)
        if columns is not None:
            sums, weight = sums.index_select(1, columns), weight.index_select(1, columns)
        return torch.einsum("oiu,biu->boi", weight.flatten(2), sums.flatten(2)).clamp(min=0)


def outside(positions: Tensor | None, size: int) -> bool:
    """Whether any of `positions` (None: all, which fit) falls outside 0..size−1: a tap read from a file."""
    return positions is not None and positions.numel() > 0 and \
        (int(positions.min()) < 0 or int(positions.max()) >= size)


def flat_features(x: Tensor, columns: Tensor | None) -> Tensor:
    """A layer's input per sample, flattened, at `columns` only (None: all)."""
    x = x.reshape(x.shape[0], -1) if x.dim() > 2 else x
    return x if columns is None else x.index_select(1, columns)


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def raw_score(method: str, logits: Tensor, features: Tensor | None, patterns: list[Tensor],
              stats: dict[str, Tensor], neighbours: int = KNN_NEIGHBOURS, exclude_self: bool = False) -> Tensor:
    """The gate's score s(x) for one component (higher = more typical of its own images), per sample.
    `exclude_self` (fitting only): the k-NN bank holds the very images scored, so each skips its own entry."""
    if method == "msp":
        return logits.softmax(1).amax(1)
    if method == "energy":
        return logits.logsumexp(1)
    if method == "mahalanobis":
        centred = features.unsqueeze(1) - stats["means"].unsqueeze(0)             # B × K × d
        distances = torch.einsum("bkd,de,bke->bk", centred, stats["precision"], centred)
        return -distances.amin(1)
    if method in ("knn", "nearest"):
        # one algorithm at every batch size (cdist picks another above 25 rows): exports keep the batch dynamic
        distances = torch.cdist(_unit(features), stats["bank"], compute_mode="use_mm_for_euclid_dist")
        k = min((neighbours if method == "knn" else NEAREST_NEIGHBOURS) + (1 if exclude_self else 0),
                distances.shape[1])
        return -distances.topk(k, dim=1, largest=False).values[:, -1]
    if method == "pattern":
        similarity = None
        for layer, pattern in enumerate(patterns):
            cosine = _unit(pattern.flatten(1)) @ stats[f"profile{layer}"].T                # B × K
            similarity = cosine if similarity is None else similarity + cosine
        return (similarity / len(patterns)).amax(1)
    raise ModellegoError(f"unknown gate {method!r}; choose one of {', '.join(GATES)}")


# --- fitting on one component's own data -----------------------------------------------------------------------

def component_taps(model: nn.Module, example_input: Tensor | tuple[int, ...], start: int = 0) -> ComponentTaps:
    """The taps of a standalone component (every row and column its own): its classifier's input and its
    last `PATTERN_LAYERS` parameter layers that read another layer's output (not the image) and are ungrouped."""
    example = example_batch(model, example_input)
    name, classifier = head(model, example)
    return ComponentTaps(start, start + classifier.out_features, Tap(name),
                         [Tap(layer) for layer in pattern_layers(model, example)])


def pattern_layers(model: nn.Module, example: Tensor) -> list[str]:
    """The parameter layers the `pattern` gate compares: the last `PATTERN_LAYERS` that take another layer's
    channels (not the image) and are not grouped, in execution order."""
    with torch.enable_grad():  # torch-pruning traces through autograd
        graph = ChannelGraph(model, example)
    layers = parameter_layers(model)
    eligible = [name for name in execution_order(model, example) if graph.feeds(name)
                and not (isinstance(layers[name], nn.Conv2d) and layers[name].groups > 1)]
    return eligible[-PATTERN_LAYERS:]


def read_layers(taps: Sequence[ComponentTaps], method: str) -> set[str]:
    """The layers whose inputs `method` reads: each component's classifier input (feature gates), its compared
    layers (`pattern`); none for the gates that read logits only."""
    layers = {tap.features.layer for tap in taps} if method in FEATURE_GATES else set()
    if method == "pattern":
        layers.update(t.layer for tap in taps for t in tap.pattern)
    return layers


@torch.no_grad()
def observe(model: nn.Module, images: Tensor, taps: Sequence[ComponentTaps], method: str
            ) -> tuple[Tensor, list[tuple[Tensor, Tensor | None, list[Tensor]]]]:
    """Run `model` once on `images`; per component: its raw logits slice, its features (feature gates) and its
    contribution blocks (`pattern`), read through hooks."""
    modules = dict(model.named_modules())
    with recorded_inputs(model, read_layers(taps, method)) as inputs:
        inputs[""] = images
        logits = model(images)
    return logits, [_component_view(logits, inputs, modules, tap, method) for tap in taps]


def image_features(images: Tensor) -> Tensor:
    """What `nearest` compares: the input images average-pooled to at most NEAREST_SIDE² pixels, flattened."""
    side = (min(images.shape[2], NEAREST_SIDE), min(images.shape[3], NEAREST_SIDE))
    if side != tuple(images.shape[2:]):
        images = nn.functional.adaptive_avg_pool2d(images, side)
    return images.flatten(1)


def _component_view(logits: Tensor, inputs: dict[str, Tensor], modules: dict[str, nn.Module], tap: ComponentTaps,
                    method: str) -> tuple[Tensor, Tensor | None, list[Tensor]]:
    if method == "nearest":
        features = image_features(inputs[""])  # the assembly's input, stored under the root module's name
    else:
        features = flat_features(inputs[tap.features.layer], tap.features.columns) if method in FEATURE_GATES else None
    patterns = [contribution_block(modules[t.layer], inputs[t.layer], t.rows, t.columns)
                for t in tap.pattern] if method == "pattern" else []
    return logits[:, tap.start:tap.stop], features, patterns


@torch.no_grad()
def _observed_batches(model: nn.Module, data: Dataset, taps: ComponentTaps, method: str,
                      batch_size: int) -> list[tuple[Tensor, Tensor, Tensor | None, list[Tensor]]]:
    """Per batch of `data`, in order: the component's logits, the labels, its features and patterns. Under
    torchrun each process observes its share of the batches and all are gathered in batch order, so the
    statistics are exactly the one-process ones. The forward pass runs on the model's device at the current
    `runtime` precision (it only scores); what it observes comes back to the CPU in float32."""
    batches = list(BatchSampler(SequentialSampler(range(len(data))), batch_size, drop_last=False))
    mine = distributed.own(list(range(len(batches))))
    observed = []
    device = runtime.device_of(model)
    loader = runtime.loader(data, device, batch_sampler=[batches[index] for index in mine])

    def cpu(tensor: Tensor | None) -> Tensor | None:
        return None if tensor is None else tensor.float().cpu()

    for index, (images, targets) in zip(mine, loader):
        with runtime.ranking(device):
            _, [(own_logits, own_features, own_patterns)] = observe(model, images.to(device), [taps], method)
        observed.append((index, (cpu(own_logits), torch.as_tensor(targets), cpu(own_features),
                                 [cpu(p.flatten(1)) for p in own_patterns])))
    if distributed.active():
        observed = sorted((item for part in distributed.gather(observed) for item in part), key=lambda item: item[0])
    return [batch for _, batch in observed]


def fit(method: str, model: nn.Module, data: Dataset, example_input: Tensor | tuple[int, ...] | None = None,
        batch_size: int = 256) -> dict[str, Tensor]:
    """A gate's statistics for one component from its own training images (`data`, labelled by its outputs):
    the method's class statistics, then the mean and deviation of its score on those images."""
    if method not in GATES:
        raise ModellegoError(f"unknown gate {method!r}; choose one of {', '.join(GATES)}")
    if len(data) == 0:
        raise ModellegoError("a component's training data is empty; a gate needs its own images")
    model = model.eval()
    example = example_input if example_input is not None else tuple(data[0][0].shape)
    taps = component_taps(model, example)
    if method == "pattern" and not taps.pattern:
        raise ModellegoError("the pattern gate needs a layer that reads another layer's channels (ungrouped); "
                             "this model has none: choose another calibration")
    logits, features, patterns, labels = [], [], [], []
    for own_logits, targets, own_features, own_patterns in _observed_batches(model, data, taps, method, batch_size):
        logits.append(own_logits)
        labels.append(targets)
        if own_features is not None:
            features.append(own_features)
        if own_patterns:
            patterns.append(own_patterns)
    logits, labels = torch.cat(logits), torch.cat(labels)
    classes = logits.shape[1]
    stats: dict[str, Tensor] = {}
    joined_features = torch.cat(features) if features else None
    joined_patterns = [torch.cat([batch[layer] for batch in patterns]) for layer in range(len(taps.pattern))] \
        if patterns else []
    if method == "mahalanobis":
        stats.update(_gaussian(joined_features.double(), labels, classes))
    elif method in ("knn", "nearest"):
        stats["bank"] = _unit(joined_features)
    elif method == "pattern":
        for layer, values in enumerate(joined_patterns):
            stats[f"profile{layer}"] = _unit(_class_means(values, labels, classes))
    scores = raw_score(method, logits, joined_features, joined_patterns,
                       {k: v.to(logits.dtype) for k, v in stats.items()}, exclude_self=method == "knn")
    stats = {k: v.float() for k, v in stats.items()}
    if method == "nearest":
        stats.update(mean=torch.zeros(1), std=torch.full((1,), NEAREST_SCALE))
        return stats
    stats["mean"] = scores.mean().reshape(1).float()
    # A spread below a thousandth of the score's size is degenerate (a saturated softmax): floored, so that float
    # noise is not magnified into the gate's decision.
    floor = 1e-3 * max(1.0, abs(stats["mean"].item()))
    stats["std"] = (scores.std().clamp(min=floor) if len(scores) > 1 else torch.tensor(floor)).reshape(1).float()
    return stats


def _class_means(values: Tensor, labels: Tensor, classes: int) -> Tensor:
    sums = torch.zeros(classes, values.shape[1], dtype=values.dtype).index_add_(0, labels, values)
    counts = torch.bincount(labels, minlength=classes).clamp(min=1).unsqueeze(1)
    return sums / counts


def _gaussian(features: Tensor, labels: Tensor, classes: int) -> dict[str, Tensor]:
    """Class means and the precision of the shared (within-class) covariance, shrunk towards its mean variance
    so that it is invertible even with fewer images than features or dead (constant) features."""
    means = _class_means(features, labels, classes)
    centred = features - means[labels]
    covariance = centred.T @ centred / max(len(features) - 1, 1)
    scale = covariance.diagonal().mean().clamp(min=MIN_VARIANCE)
    shrunk = (1 - SHRINKAGE) * covariance + SHRINKAGE * scale * torch.eye(len(covariance), dtype=covariance.dtype)
    return {"means": means, "precision": torch.linalg.inv(shrunk)}


# --- the gate inside an assembly -----------------------------------------------------------------------------

_STAT_DIMS = {"msp": {}, "energy": {}, "mahalanobis": {"means": 2, "precision": 2}, "knn": {"bank": 2},
              "nearest": {"bank": 2}}


class Gate(nn.Module):
    """Weighs the components' answers by how typical the input is of each component's own images (see the module
    docstring). Everything it needs is a buffer, shaped from the file on load; `config` (JSON) says which
    method, temperature and where each component's logits, features and layers sit."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.config = config
        self.method = config["method"]
        self.temperature = float(config.get("temperature", DEFAULT_TEMPERATURE))
        self.neighbours = int(config.get("neighbours", KNN_NEIGHBOURS))
        self.components = config["components"]
        for c, component in enumerate(self.components):
            dims = dict(_STAT_DIMS.get(self.method, {}))
            if self.method == "pattern":
                dims.update({f"profile{layer}": 2 for layer in range(len(component["pattern"]))})
            for name, ndim in {**dims, "mean": 1, "std": 1}.items():
                self.register_buffer(f"c{c}_{name}", torch.zeros((1,) * ndim))
            for t, tap in enumerate([component["features"], *component["pattern"]]):
                for part in ("rows", "columns"):
                    if tap.get(part):
                        self.register_buffer(f"c{c}_t{t}_{part}", torch.zeros(1, dtype=torch.long))

    @classmethod
    def build(cls, method: str, taps: Sequence[ComponentTaps], stats: Sequence[dict[str, Tensor]],
              temperature: float = DEFAULT_TEMPERATURE) -> "Gate":
        """A gate from each component's taps (where it sits in the assembly) and its fitted statistics."""
        if method not in GATES:
            raise ModellegoError(f"unknown gate {method!r}; choose one of {', '.join(GATES)}")
        if not (math.isfinite(temperature) and TEMPERATURES[0] <= temperature <= TEMPERATURES[1]):
            raise ModellegoError(f"the gate temperature must be between {TEMPERATURES[0]:g} and "
                                 f"{TEMPERATURES[1]:g}, got {temperature}")

        def describe(tap: Tap) -> dict[str, Any]:
            return {"layer": tap.layer, "rows": tap.rows is not None, "columns": tap.columns is not None}

        config = {"method": method, "temperature": temperature, "neighbours": KNN_NEIGHBOURS,
                  "components": [{"start": tap.start, "stop": tap.stop, "features": describe(tap.features),
                                  "pattern": [describe(t) for t in tap.pattern] if method == "pattern" else []}
                                 for tap in taps]}
        gate = cls(config)
        for c, (tap, own) in enumerate(zip(taps, stats)):
            for name, value in own.items():
                setattr(gate, f"c{c}_{name}", value.clone())
            for t, one in enumerate([tap.features, *(tap.pattern if method == "pattern" else [])]):
                for part in ("rows", "columns"):
                    value = getattr(one, part)
                    if value is not None:
                        setattr(gate, f"c{c}_t{t}_{part}", value.clone().long())
        return gate

    def problem(self, assembly: nn.Module, example_input: Tensor | tuple[int, ...]) -> str | None:
        """What makes this gate (read from a file) unfit for `assembly`, the model it sits on, or None: its
        temperature and statistics within bounds that keep its arithmetic finite (deviations at least the floor
        fitting gives them), one logit slice per component following each other over all outputs, and taps at
        the layers its method reads (a component's classifier input; `pattern`: its compared layers), at
        positions inside them."""
        if not TEMPERATURES[0] <= self.temperature <= TEMPERATURES[1]:
            return f"gate temperature {self.temperature:g} is outside {TEMPERATURES[0]:g}..{TEMPERATURES[1]:g}"
        outputs = int(assembly.merge.targets.numel())
        stop = 0
        for c, component in enumerate(self.components):
            if component["start"] != stop or component["stop"] > outputs:
                return (f"gate component {c} reads logits {component['start']}..{component['stop']}; the components' "
                        f"slices must follow each other over the {outputs} outputs")
            stop = component["stop"]
        if stop != outputs:
            return f"the gate's components read {stop} of the {outputs} outputs"
        for c in range(len(self.components)):
            stats = self.stats(c)
            for name, value in stats.items():
                if value.is_floating_point() and not (torch.isfinite(value).all() and
                                                      value.abs().max() <= MAX_STATISTIC):
                    return f"gate statistic c{c}_{name} is not finite or beyond {MAX_STATISTIC:g} in magnitude"
            floor = 1e-3 * max(1.0, abs(float(stats["mean"].item())))
            if self.method != "nearest" and not float(stats["std"].item()) >= floor * (1 - 1e-6):
                return f"gate deviation c{c}_std is {float(stats['std'].item()):g}, below its floor {floor:g}"
            if self.method == "nearest" and not math.isclose(float(stats["std"].item()), NEAREST_SCALE, rel_tol=1e-6):
                return f"the nearest gate's scale c{c}_std must be {NEAREST_SCALE}"
        return self._tap_problem(assembly, example_input)

    def _tap_problem(self, assembly: nn.Module, example_input: Tensor | tuple[int, ...]) -> str | None:
        modules = dict(assembly.named_modules())
        parallel = isinstance(assembly, Parallel)
        for c, tap in enumerate(self.taps()):
            owner, prefix = (assembly.members[c], f"members.{c}.") if parallel else (assembly, "")
            owner_example = example_batch(owner, example_input)
            if self.method in FEATURE_GATES:
                classifier = prefix + head(owner, owner_example)[0]
                if tap.features.layer != classifier:
                    return f"gate component {c} reads features at {tap.features.layer}, not its classifier's input"
            if self.method == "pattern":
                allowed = {prefix + name for name in pattern_layers(owner, owner_example)}
                if any(t.layer not in allowed for t in tap.pattern):
                    return f"gate component {c} compares patterns at layers the pattern gate does not read"
            for one in [tap.features, *tap.pattern]:
                layer = modules.get(one.layer)
                if not isinstance(layer, (nn.Conv2d, nn.Linear)):
                    return f"gate component {c} reads {one.layer}, which is not a Conv2d or Linear layer"
                inputs = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
                outputs = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
                for positions, size, what in ((one.columns, inputs, "inputs"), (one.rows, outputs, "outputs")):
                    if outside(positions, size):
                        return f"gate component {c} reads positions of {one.layer} outside its {size} {what}"
        return None

    def taps(self) -> list[ComponentTaps]:
        """Where each component sits, with its index buffers."""
        result = []
        for c, component in enumerate(self.components):
            taps = []
            for t, tap in enumerate([component["features"], *component["pattern"]]):
                taps.append(Tap(tap["layer"], getattr(self, f"c{c}_t{t}_rows") if tap.get("rows") else None,
                                getattr(self, f"c{c}_t{t}_columns") if tap.get("columns") else None))
            result.append(ComponentTaps(component["start"], component["stop"], taps[0], taps[1:]))
        return result

    def stats(self, c: int) -> dict[str, Tensor]:
        prefix = f"c{c}_"
        return {name[len(prefix):]: value for name, value in self.named_buffers() if name.startswith(prefix)}

    def typicality(self, views: list[tuple[Tensor, Tensor | None, list[Tensor]]]) -> Tensor:
        """z[b, c]: each component's score on each input, z-scored on its own training images."""
        columns = []
        for c, (logits, features, patterns) in enumerate(views):
            stats = self.stats(c)
            score = raw_score(self.method, logits, features, patterns, stats, self.neighbours)
            columns.append((score - stats["mean"]) / stats["std"])
        return torch.stack(columns, 1)

    def combine(self, logits: Tensor, views: list[tuple[Tensor, Tensor | None, list[Tensor]]]) -> Tensor:
        """The calibrated logits: each component's log-posterior plus the log of its gate weight."""
        weights = (self.typicality(views) / self.temperature).log_softmax(1)
        parts = [view[0].log_softmax(1) + weights[:, c:c + 1] for c, view in enumerate(views)]
        return torch.cat(parts, 1)


class Calibrated(nn.Module):
    """An assembly (`assembly`, whose last step is its MergeOutputs) with a `gate` between the concatenated
    component logits and the merge. Running it reads each component's logits, features and layer inputs
    through hooks that live only during the forward pass."""

    def __init__(self, assembly: nn.Module, gate: Gate) -> None:
        super().__init__()
        self.assembly = assembly
        self.gate = gate

    def forward(self, x: Tensor) -> Tensor:
        modules = dict(self.assembly.named_modules())
        merge = self.assembly.merge
        taps = self.gate.taps()
        method = self.gate.method
        with recorded_inputs(self.assembly, read_layers(taps, method)) as inputs:
            inputs[""] = x

            def gated(module: nn.Module, args: tuple) -> tuple:
                logits = args[0]
                views = [_component_view(logits, inputs, modules, tap, method) for tap in taps]
                return (self.gate.combine(logits, views),)

            handle = merge.register_forward_pre_hook(gated)
            try:
                return self.assembly(x)
            finally:
                handle.remove()
