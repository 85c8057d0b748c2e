"""`modellego profile`: the per-class contributions of every parameter layer, summed over each class's most
confident correct training samples, written to a profile file — for any model kind."""

from __future__ import annotations

from modellego import distributed
from modellego.commands.common import FilePath, open_model
from modellego.core.profile import Profile
from modellego.data.task import DataOptions
from modellego.io.atomic import check_output_path
from modellego.io.profiles import save_profile


def profile(model_path: FilePath, out: FilePath, samples_per_class: int = 50, dataset: str | None = None,
            data: DataOptions | None = None, batch_size: int | None = None, progress: bool = True) -> Profile:
    """Profile a model file on its training data (or `dataset`'s, matched by class names) and save the profile."""
    data = data or DataOptions()
    check_output_path(out, inputs=[model_path])
    (model, manifest), kind = open_model(model_path)
    kind.check_options({"--batch-size": batch_size is not None, "--image-size": data.image_size is not None,
                        "--no-verify": not data.verify})
    result = kind.profile(model, kind.data(manifest, "train", data, dataset=dataset), samples_per_class,
                          batch_size or 64, progress)
    if distributed.is_main():
        save_profile(result, out)
    return result
