"""`modellego train` and `modellego finetune`: a model trained from scratch on a dataset, or a model file (an
assembly) trained further on its classes — for any model kind."""

from __future__ import annotations

from modellego.commands.common import Device, FilePath, open_model, runs_models, runtime_options, write
from modellego.data.task import DataOptions
from modellego.io.atomic import check_output_path
from modellego.io.manifest import Brick
from modellego.kinds import Trained, TrainOptions, kind_for_request


@runs_models
def train(builder: str, dataset: str, out: FilePath, epochs: int | None = None, classes: str | None = None,
          width: float = 1.0, lr: float | None = None, batch_size: int | None = None,
          max_per_class: int | None = None, data: DataOptions | None = None, seed: int = 0, progress: bool = True,
          auto_batch: bool = False, device: Device = "auto", precision: str | None = None,
          workers: int | None = None) -> Trained:
    """Train `builder` on `dataset` (or some of its classes), evaluate it on the test split, save it to `out`.
    None means the kind's default (3 epochs at lr 1e-3 and batch 128 for images; 200 full-graph steps at lr
    0.01 for a GCN, which `--model gcn` or a graph dataset asks for). A batch size too large for the memory
    available is refused before training, or lowered with `auto_batch`. The model trains on `device` (see
    `runtime.resolve_device`); `precision` applies to the evaluation after training, `workers` to data loading."""
    data = data or DataOptions()
    kind = kind_for_request(builder, dataset)
    kind.check_options({"--batch-size": batch_size is not None, "--auto-batch": auto_batch,
                        "--image-size": data.image_size is not None, "--no-verify": not data.verify,
                        **runtime_options(precision, workers)})
    check_output_path(out)
    result = kind.train(builder, dataset, TrainOptions(epochs, classes, width, lr, batch_size, max_per_class, seed,
                                                       auto_batch, device), data, progress)
    write(result.brick.model, out, result.brick.manifest)
    return result


@runs_models
def finetune(path: FilePath, out: FilePath, epochs: int = 2, lr: float | None = None, batch_size: int | None = None,
             data: DataOptions | None = None, seed: int = 0, progress: bool = True, auto_batch: bool = False,
             device: Device = "auto", precision: str | None = None, workers: int | None = None) -> Brick:
    """Train a model file (an assembly: its zero blocks too) on the training data of all its classes; save it.
    A batch size too large for the memory available is refused before training, or lowered with `auto_batch`.
    The model trains on `device`; `precision` applies to the accuracy check after training (recorded in the
    provenance), `workers` to data loading."""
    data = data or DataOptions()
    check_output_path(out, inputs=[path])
    brick, kind = open_model(path, device)
    kind.check_options({"--batch-size": batch_size is not None, "--auto-batch": auto_batch,
                        "--image-size": data.image_size is not None, "--no-verify": not data.verify,
                        **runtime_options(precision, workers)})
    result = kind.finetune(brick, kind.data(brick.manifest, "train", data), epochs, lr, batch_size, seed, progress,
                           auto_batch)
    write(result.model, out, result.manifest)
    return result
