"""Re-fitting without gradients. For now: BatchNorm re-estimation, which makes a model's running statistics
match the weights it ends up with (DESIGN.md, "Beyond the paper")."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from modellego.memory import fit_inference, sample_shape_of
from modellego.progress import track


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm layers that keep running statistics."""
    return [module for module in model.modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats]


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, dataset: Dataset, samples: int = 4096, batch_size: int = 128,
                         seed: int = 0, progress: bool = False) -> int:
    """Recompute every BatchNorm layer's running mean and variance as the average over batches of up to
    `samples` images of `dataset` (drawn with `seed`); nothing else changes, and every module ends in the mode
    it was in. Returns the number of images used (0 without BN).

    Training leaves running statistics that lag the final weights (an exponential average with a small
    momentum), which can put a model that learned at chance level in eval mode."""
    layers = batchnorm_layers(model)
    if not layers or len(dataset) == 0:
        return 0
    count = min(samples, len(dataset))
    shape = sample_shape_of(dataset)
    if shape is not None:  # a no-grad forward: sized like inference
        batch_size = fit_inference(model, shape, batch_size, "re-estimating BatchNorm statistics", samples=count)
    if count % batch_size == 1 and count > 1:
        count -= 1  # a batch of one image has no batch statistics
    if count < 2:
        return 0
    positions = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count].sort().values
    loader = DataLoader(Subset(dataset, positions.tolist()), batch_size=batch_size, shuffle=False)
    device = next(model.parameters()).device
    modes = {module: module.training for module in model.modules()}
    momenta = [layer.momentum for layer in layers]
    model.eval()  # dropout and everything else stays in inference mode; only BN computes batch statistics
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average over all batches
        layer.train()
    try:
        for images, _ in track(loader, "re-estimating BatchNorm statistics", len(loader), progress):
            model(images.to(device))
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        for module, training in modes.items():
            module.training = training
    return count
