"""Training loops (Adam, cross-entropy, one-cycle), repeatable under a seed, on one process or under torchrun; what
a trained model is checked for afterwards (BatchNorm re-estimated, accuracy on its own training data)."""

from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, Dataset, RandomSampler, Subset

from modellego import distributed, runtime
from modellego.core.evaluate import accuracy_of, predict
from modellego.core.reconstruct import reestimate_batchnorm
from modellego.errors import ModellegoError
from modellego.progress import track

TRAINING_CHECK_SAMPLES = 2000


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; returns a generator for data-loader shuffling."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def train(model: nn.Module, dataset: Dataset, epochs: int, lr: float = 1e-3, batch_size: int = 128,
          seed: int = 0, weight_decay: float = 0.0, progress: bool = True) -> list[float]:
    """Train `model` in place on `dataset` (labels = output indices); returns the mean loss per epoch."""
    if epochs <= 0:
        raise ModellegoError(f"epochs must be a positive number, got {epochs}")
    if not math.isfinite(lr) or lr <= 0:
        raise ModellegoError(f"the learning rate must be a positive finite number, got {lr}")
    if batch_size < 1:
        raise ModellegoError(f"the batch size must be at least 1, got {batch_size}")
    if not 0 <= seed < 2**64:
        raise ModellegoError(f"the seed must be in 0..2**64-1, got {seed}")
    if len(dataset) == 0:
        raise ModellegoError("the training data is empty")
    generator = seed_everything(seed)
    device = next(model.parameters()).device
    if distributed.active():
        if batch_size < distributed.world_size():
            raise ModellegoError(f"the batch size ({batch_size}) is smaller than the number of processes "
                                 f"({distributed.world_size()}); each process needs at least one image per step")
        # the generator also seeds the loader, as in one process: both draw the same permutations
        loader = runtime.loader(dataset, device, batch_sampler=GlobalBatchShards(dataset, batch_size, generator),
                                generator=generator)
        network: nn.Module = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    else:
        loader = runtime.loader(dataset, device, batch_size=batch_size, shuffle=True, generator=generator)
        network = model
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * len(loader))
    loss_fn = nn.CrossEntropyLoss()
    losses = []
    model.train()
    for epoch in range(epochs):
        total, count = 0.0, 0
        for images, labels in track(loader, f"epoch {epoch + 1}/{epochs}", len(loader), progress):
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss, batch = _global_mean_loss(loss_fn, network(images), labels)
            loss.backward()
            optimizer.step()
            schedule.step()
            batch_loss = loss.item()
            if distributed.active():  # the global batch's mean loss, the same in every process
                share = loss.detach().reshape(1) * batch / distributed.world_size()
                batch_loss = distributed.sum_(share).item() / batch
            if not math.isfinite(batch_loss):
                raise ModellegoError(f"training diverged (the loss became {batch_loss}) in epoch {epoch + 1}; "
                                     "lower the learning rate (--lr)")
            total += batch_loss * batch
            count += batch
        losses.append(total / count)
    model.eval()
    return losses


def _global_mean_loss(loss_fn: nn.CrossEntropyLoss, logits: torch.Tensor,
                      labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The loss to back-propagate and the global batch size. In one process, the batch's mean loss. Under
    torchrun, this process's summed loss over the global batch times the number of processes: DDP averages the
    gradients over the processes, which gives the one-process gradient of the global batch's mean loss."""
    if not distributed.active():
        return loss_fn(logits, labels), len(labels)
    batch = int(distributed.sum_(torch.tensor([len(labels)], device=labels.device)).item())
    summed = nn.functional.cross_entropy(logits, labels, reduction="sum")
    return summed * distributed.world_size() / batch, batch


class GlobalBatchShards(BatchSampler):
    """Under torchrun: the batches one process would draw with the same generator (the same permutation, the
    same boundaries), each cut into world_size contiguous shares, this process's share yielded. A last batch
    smaller than the number of processes is dropped, so that no process steps on nothing."""

    def __init__(self, dataset: Dataset, batch_size: int, generator: torch.Generator) -> None:
        super().__init__(RandomSampler(dataset, generator=generator), batch_size, drop_last=False)

    def __iter__(self):
        world, rank = distributed.world_size(), distributed.rank()
        for batch in super().__iter__():
            if len(batch) < world:
                continue
            share = [part.tolist() for part in torch.tensor(batch).tensor_split(world)][rank]
            yield share

    def __len__(self) -> int:
        full, rest = divmod(len(self.sampler), self.batch_size)
        world = distributed.world_size()
        return (full if self.batch_size >= world else 0) + (1 if rest >= world else 0)


@dataclass
class TrainingCheck:
    """Eval-mode accuracy of a trained model on (up to `samples`) of its own training images: overall, per
    class (keyed by class name), and the chance level on them (the share of their most frequent class)."""

    accuracy: float
    chance: float
    samples: int
    per_class: dict[str, float]


def training_accuracy(model: nn.Module, dataset: Dataset, samples: int = TRAINING_CHECK_SAMPLES,
                      seed: int = 0) -> TrainingCheck:
    """Eval-mode accuracy of `model` on up to `samples` images of `dataset` (drawn with `seed`), overall and per
    class, and the chance level on them."""
    count = min(samples, len(dataset))
    positions = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count].sort().values
    logits, labels = predict(model, Subset(dataset, positions.tolist()))
    names = getattr(dataset, "classes", None) or [str(k) for k in range(logits.shape[1])]
    result = accuracy_of(logits.argmax(1), labels, list(names))
    chance = torch.bincount(labels).max().item() / count
    return TrainingCheck(result.accuracy, chance, count, result.per_class)


def warn_if_at_chance(accuracy: float, chance: float, samples: int) -> bool:
    """Warn when a trained model is not clearly above chance on its own training data: below chance plus a
    tenth of the way from chance to 100% (19% for 10 balanced classes). Returns whether it warned."""
    if accuracy >= chance + 0.1 * (1 - chance):
        return False
    warnings.warn(f"the model is at chance level on its own training data: {100 * accuracy:.1f}% on {samples:,} "
                  f"training images (chance {100 * chance:.1f}%); train longer (more --epochs), try a lower --lr "
                  "(if the loss diverged) or a higher one (if it barely moved), or a larger --batch-size",
                  stacklevel=3)
    return True


WEAK_CLASS = 0.5  # a class the trained model gets right on fewer than this share of its training images is named


def warn_about_weak_classes(per_class: dict[str, float], unit: str = "image") -> list[str]:
    """Warn, once per class, about every class the model gets right on fewer than half of its own training
    images (a class at 0% makes `profile` refuse later); returns those classes."""
    weak = [name for name, value in per_class.items() if value < WEAK_CLASS]
    for name in weak:
        warnings.warn(f"class {name!r} is right on only {100 * per_class[name]:.1f}% of its own training {unit}s "
                      "in eval mode; train longer (more --epochs) or with another --lr, or check its data",
                      stacklevel=3)
    return weak


def settle(model: nn.Module, dataset: Dataset, seed: int, progress: bool) -> dict:
    """After training: re-estimate BatchNorm statistics (at an inference batch size, not training's), then check
    the model learned, overall and per class; the facts for provenance."""
    images = reestimate_batchnorm(model, dataset, seed=seed, progress=progress)
    check = training_accuracy(model, dataset, seed=seed)
    warn_if_at_chance(check.accuracy, check.chance, check.samples)
    warn_about_weak_classes(check.per_class)
    return {"batchnorm_reestimated_images": images, "train_accuracy": check.accuracy,
            "train_accuracy_images": check.samples}


def processes() -> dict:
    """For provenance: how many processes trained (only recorded when several did)."""
    return {"world_size": distributed.world_size()} if distributed.active() else {}
