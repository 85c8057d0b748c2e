"""The method's commands: `profile`, `disassemble`, `assemble`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from modellego.cli.options import (
    MAX_SAMPLES_PER_CLASS,
    AlphaConvOption,
    AlphaFcOption,
    BetaConvOption,
    BetaFcOption,
    DataOption,
    DataRootOption,
    DeviceOption,
    GridStepOption,
    ImageSizeOption,
    InferenceBatchOption,
    LazyModule,
    NoVerifyOption,
    PrecisionOption,
    RidgeOption,
    SeedOption,
    WorkersOption,
    app,
    check_batch,
    classes_option,
    commands,
    data_options,
    option_int,
    option_seed,
    option_text,
    out,
    percent,
    run_options,
    safe,
)
from modellego.core.thresholds import DEFAULT_FLATTEN, Thresholds
from modellego.errors import ModellegoError

evaluation = LazyModule("modellego.core.evaluate")
kinds = LazyModule("modellego.kinds")


@app.command()
def profile(
    model: Path = typer.Argument(..., help="The model file to profile."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="Profile file to write (.safetensors)."),
    samples_per_class: int = typer.Option(50, "--samples-per-class", help="Most confident correct training samples per class."),
    classes: Optional[str] = typer.Option(None, "--classes", help="Profile these classes only: names or indices, "
                                          "comma-separated (default: all)."),
    classes_file: Optional[Path] = typer.Option(None, "--classes-file", help="Profile the classes named in this "
                                                "file, one name or index per line."),
    append: Optional[Path] = typer.Option(None, "--append", help="Add the classes to this profile of the model "
                                          "(written in place, atomically) instead of writing --out."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 (default), or float16 (half the file); "
                                        "classes appended take the profile's."),
    data: Optional[str] = DataOption,
    data_root: Optional[Path] = DataRootOption,
    image_size: Optional[int] = ImageSizeOption,
    no_verify: bool = NoVerifyOption,
    batch_size: Optional[int] = InferenceBatchOption,
    device: str = DeviceOption,
    precision: str = PrecisionOption,
    workers: Optional[int] = WorkersOption,
) -> None:
    """Per-class contributions of every parameter layer, on the model's training data."""
    option_int("--samples-per-class", samples_per_class, 1, MAX_SAMPLES_PER_CLASS)
    check_batch(batch_size)
    option_text("--classes", classes)
    if (out_path is None) == (append is None):
        raise ModellegoError("give --out FILE (a new profile) or --append PROFILE (add classes to it), one of them")
    asked = classes_option(classes, classes_file)
    result = commands.profile(model, append or out_path, samples_per_class, data,
                              data_options(data_root, image_size, no_verify), batch_size, classes=asked,
                              append=append is not None, dtype=dtype, **run_options(device, precision, workers))
    held = [name for _, name, *_ in result.records]
    out.print(safe(f"profiled {len(result.layers)} layers on {sum(count for _, _, count, _ in result.records)} "
                   f"samples of {len(held)} classes ({samples_per_class} per class asked, {result.dtype}) -> "
                   f"{append or out_path}"))


@app.command()
def disassemble(
    model: Path = typer.Argument(..., help="The source model file."),
    profile_path: Path = typer.Option(..., "--profile", help="The source model's profile (modellego profile)."),
    classes: str = typer.Option(..., "--classes", help="The task: class names or indices, comma-separated, in output order."),
    out_path: Path = typer.Option(..., "--out", help="Component file to write (.safetensors)."),
    alpha_conv: float = AlphaConvOption,
    beta_conv: float = BetaConvOption,
    alpha_fc: float = AlphaFcOption,
    beta_fc: float = BetaFcOption,
    auto: bool = typer.Option(False, "--auto", help="Search α/β for the smallest component within --max-drop."),
    max_drop: float = typer.Option(1.0, "--max-drop", help="With --auto: accuracy points the component may lose on validation data."),
    grid_step: float = GridStepOption,
    evaluate: bool = typer.Option(False, "--evaluate", help="Also measure and record test accuracy, Base and "
                                  "Restricted base (an assembly's mean Base needs them; `eval --against` gives them any time)."),
    no_reconstruct: bool = typer.Option(False, "--no-reconstruct", help="The paper's pure method: no re-fitting of "
                                        "the component's layers and no BatchNorm re-estimation."),
    reconstruct_samples: Optional[int] = typer.Option(None, "--reconstruct-samples", help="Re-fit on N training "
                                                      "samples per task class (default: the profile's samples of the task)."),
    ridge: float = RidgeOption,
    flatten: str = typer.Option(DEFAULT_FLATTEN.value, "--flatten", help="Where conv channels are flattened into a "
                                "Linear layer: any-feature keeps a channel if any of its features is kept; keep-all "
                                "keeps them all (the official code's behaviour)."),
    data_root: Optional[Path] = DataRootOption,
    image_size: Optional[int] = ImageSizeOption,
    no_verify: bool = NoVerifyOption,
    seed: int = SeedOption,
    device: str = DeviceOption,
    precision: str = PrecisionOption,
    workers: Optional[int] = WorkersOption,
) -> None:
    """Cut a standalone component for some classes out of a model, without training."""
    option_text("--classes", classes)
    option_seed(seed)
    if reconstruct_samples is not None:
        option_int("--reconstruct-samples", reconstruct_samples, 1, MAX_SAMPLES_PER_CLASS)
    result = commands.disassemble(model, profile_path, classes, out_path,
                                  Thresholds(alpha_conv, beta_conv, alpha_fc, beta_fc), auto, max_drop, evaluate,
                                  data_options(data_root, image_size, no_verify), seed, reconstruct=not no_reconstruct,
                                  reconstruct_samples=reconstruct_samples, flatten=flatten, ridge=ridge,
                                  grid_step=grid_step, **run_options(device, precision, workers))
    unit = result.unit
    if result.search is not None:
        search = result.search
        held_out = "validation nodes" if unit == "node" else "held-out training samples"
        pairs = " ".join(f"{name.replace('alpha', 'α').replace('beta', 'β')}={value}"
                         for name, value in search.masks.settings.items())
        out.print(f"--auto: restricted base on {search.validation_samples} {held_out} "
                  f"{percent(search.restricted_base)}; chose {pairs} (validation {percent(search.accuracy)}, "
                  f"{len(search.candidates)} of {search.grid} grid points evaluated)")
        pair = ("alpha_conv", "beta_conv") if "alpha_conv" in search.masks.settings else ("alpha_fc", "beta_fc")
        out.print("Pareto front (validation accuracy vs FLOPs): " + ", ".join(
            f"α {c[pair[0]]}/β {c[pair[1]]}: {percent(c['accuracy'])} at {c['flops']:,}"
            for c in result.auto["pareto"]))
    if result.reconstruction is not None:
        refit = result.reconstruction
        out.print(f"reconstructed: {refit.layers} layers re-fitted on {refit.images} training {unit}s "
                  f"(ridge {refit.ridge:g}), no gradients")
    metrics = result.metrics
    accuracy = (f"test accuracy {percent(metrics['test_accuracy'])} (restricted base "
                f"{percent(metrics['restricted_base'])}), " if evaluate else "")
    out.print(safe(f"component for {', '.join(result.brick.manifest.class_names)}: {accuracy}"
                   f"{metrics['params']:,} params ({evaluation.count_params(result.source.model):,} in the source), "
                   f"{metrics['flops']:,} FLOPs -> {out_path}"))


@app.command()
def assemble(
    components: list[Path] = typer.Argument(..., help="Two or more component files (or any modellego models)."),
    out_path: Path = typer.Option(..., "--out", help="Assembled model file to write (.safetensors)."),
    mode: Optional[str] = typer.Option(None, "--mode", help="parallel (the default): the components side by side, "
                                       "the smallest file; padded: one dense network with block-diagonal weights "
                                       "(the paper's alignment padding; CNNs only). Both give the same logits."),
    no_scale: bool = typer.Option(False, "--no-scale", help="Skip parameter scaling of the components' logits "
                                  "(the same as --calibration none)."),
    calibration: Optional[str] = typer.Option(
        None, "--calibration", help="How the assembly decides between its components: auto (default: the one "
        "that answers the components' own held-out training images best), joint (one head over all components' "
        "features, fitted in closed form), scale (the paper's parameter scaling), "
        "msp, energy, mahalanobis, pattern (gates fitted on each component's own training images: class-level "
        "statistics), knn, nearest (these store rows of the training images: need --store-training-data), none."),
    store_training_data: bool = typer.Option(False, "--store-training-data", help="Allow a calibration that "
                                             "stores rows of the components' training images in the file (knn, "
                                             "nearest); anyone with the file can read them back."),
    data_root: Optional[Path] = DataRootOption,
    image_size: Optional[int] = ImageSizeOption,
    no_verify: bool = NoVerifyOption,
    device: str = DeviceOption,
    precision: str = PrecisionOption,
    workers: Optional[int] = WorkersOption,
) -> None:
    """Assemble components into one model that answers the union of their classes, without training."""
    if no_scale and calibration not in (None, "none"):
        raise ModellegoError(f"--no-scale contradicts --calibration {calibration}; give one of them")
    result = commands.assemble(components, out_path, mode, not no_scale, data_options(data_root, image_size, no_verify),
                               calibration=calibration, store_training_data=store_training_data,
                               **run_options(device, precision, workers))
    model, manifest = result.brick
    how = f"auto: {result.calibration.value}" if result.choice and "chosen" in result.choice else result.calibration.value
    kind = kinds.kind_of(manifest.architecture)
    params, flops = evaluation.count_params(model), kind.count_flops(model, manifest.input)
    out.print(safe(f"assembled {len(components)} components ({result.mode.value}, calibration {how}): "
                   f"{len(manifest.classes)} classes, {params:,} params, {flops:,} FLOPs -> {out_path}"))
    out.print(safe(f"the components side by side: {result.members_params:,} params, {result.members_flops:,} FLOPs "
                   f"({params / max(1, result.members_params):.2f}× and {flops / max(1, result.members_flops):.2f}× "
                   f"in this {result.mode.value} assembly)"))
    if result.choice and "chosen" in result.choice:
        scores = sorted(result.choice["held_out_accuracy"].items(), key=lambda item: -item[1])
        out.print(safe(f"auto chose {result.choice['chosen']} on {result.choice['held_out_samples']:,} of the "
                       "components' own held-out training images: " +
                       ", ".join(f"{name} {100 * value:.2f}%" for name, value in scores)))
    for stored in commands.stored_training_data(manifest):
        out.print(safe(f"the file holds training data: {stored}"))
