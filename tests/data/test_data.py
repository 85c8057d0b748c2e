"""Datasets by name: real files, class selection, splits and clear errors."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
from PIL import Image
from torch.utils.data import DataLoader

from helpers import write_image_folder
from modellego import data
from modellego.data.idx import read_idx
from modellego.errors import ModellegoError
from modellego.io.manifest import ClassRef


def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_is_the_real_dataset(fashion_train, fashion_test):
    assert len(fashion_train) == 60000 and len(fashion_test) == 10000
    assert fashion_train.classes[0] == "T-shirt/top" and fashion_train.classes[9] == "Ankle boot"
    assert torch.bincount(fashion_test.targets).tolist() == [1000] * 10
    image, label = fashion_train[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0 and label == int(fashion_train.targets[0])
    assert fashion_train.spec.channels == 1 and fashion_train.spec.size == (28, 28)
    # The stored normalisation is the training set's own mean and std.
    pixels = fashion_train.images[:5000].float() / 255
    assert abs(pixels.mean().item() - fashion_train.spec.mean[0]) < 0.01


def test_batched_loading_equals_per_item_loading(fashion_test):
    subset = data.select_classes(fashion_test, "Bag,Trouser")
    images, labels = next(iter(DataLoader(subset, batch_size=16)))
    for position in range(16):
        image, label = subset[position]
        assert torch.equal(images[position], image) and labels[position] == label


def test_digits_split_is_deterministic_stratified_and_disjoint():
    train, test = data.load("digits", "train"), data.load("digits", "test")
    assert len(train) + len(test) == 1797
    assert torch.equal(test.images, data.load("digits", "test").images)
    counts = torch.bincount(test.targets)
    assert counts.min() >= 30 and counts.max() <= 40
    train_rows = {bytes(row.numpy()) for row in train.images.flatten(1)}
    assert sum(bytes(row.numpy()) in train_rows for row in test.images.flatten(1)) < 5  # near-duplicates only
    assert train[0][0].shape == (1, 28, 28) and train.classes == [str(d) for d in range(10)]


def test_select_classes_keeps_the_given_order(fashion_test):
    subset = data.select_classes(fashion_test, "Bag,Trouser")
    assert subset.classes == ["Bag", "Trouser"] and subset.class_indices == [8, 1]
    assert len(subset) == 2000 and set(subset.targets.tolist()) == {0, 1}
    position = int(subset.positions[0])
    assert subset[0][1] == (0 if int(fashion_test.targets[position]) == 8 else 1)
    by_index = data.select_classes(fashion_test, [8, "trouser"])
    assert torch.equal(by_index.targets, subset.targets)


@pytest.mark.parametrize("selection, message", [
    ("Bogus", "'Bogus' is not in"), ("12", "out of range"), ("Bag,Bag", "named twice"), ("", "no classes"),
])
def test_bad_class_selections_are_refused(fashion_test, selection, message):
    with pytest.raises(ModellegoError, match=message):
        data.select_classes(fashion_test, selection)


def test_holdout_and_slices_are_balanced_and_disjoint(fashion_train):
    rest, held = data.holdout_split(data.select_classes(fashion_train, "0,1"), 0.1, seed=3)
    assert len(held) == 1200 and len(rest) == 10800
    assert not set(held.positions.tolist()) & set(rest.positions.tolist())
    small = data.per_class_slice(fashion_train, 7)
    assert torch.bincount(small.targets).tolist() == [7] * 10


def test_unknown_and_missing_datasets_say_where_to_look(tmp_path):
    with pytest.raises(ModellegoError, match="unknown dataset 'imagenet'"):
        data.load("imagenet", "train")
    with pytest.raises(ModellegoError, match=f"looked in {tmp_path}"):
        data.load("fashion-mnist", "train", tmp_path)
    with pytest.raises(ModellegoError, match="cifar-10-batches-py"):
        data.load("cifar10", "test", tmp_path)
    with pytest.raises(ModellegoError, match="split"):
        data.load("digits", "validation")


def test_mnist_layout_and_truncated_idx(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.random.RandomState(0).randint(0, 256, (20, 28, 28))
    labels = np.arange(20) % 10
    for prefix in ("train", "t10k"):
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", labels)
    mnist = data.load("mnist", "test", tmp_path)
    assert len(mnist) == 20 and mnist.classes[3] == "3"
    assert torch.equal(mnist.images[:, 0], torch.from_numpy(images.astype(np.uint8)))
    broken = tmp_path / "broken.gz"
    with gzip.open(broken, "wb") as handle:
        handle.write(bytes([0, 0, 8, 1]) + struct.pack(">I", 100) + b"\x01" * 10)
    with pytest.raises(ModellegoError, match="truncated"):
        read_idx(broken)


def test_cifar10_layout(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.RandomState(0)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.randint(0, 256, (4, 3072)).astype(np.uint8), "labels": list(rng.randint(0, 10, 4))}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    with pytest.raises(ModellegoError, match="corrupt"):  # torchvision checks the official archive's MD5s
        data.load("cifar10", "train", tmp_path)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    cifar = data.load("cifar10", "train", tmp_path)
    assert len(cifar) == 20 and cifar.classes == names and cifar[0][0].shape == (3, 32, 32)


def test_imagefolder_and_tiny_imagenet_layouts(tmp_path):
    rng = np.random.RandomState(0)

    def picture(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.randint(0, 256, (40, 48, 3)).astype(np.uint8)).save(path)

    for split in ("train", "val"):
        for name in ("cat", "dog"):
            for i in range(3):
                picture(tmp_path / "folder" / split / name / f"{i}.png")
    folder = data.load("imagefolder", "test", tmp_path / "folder")
    assert folder.classes == ["cat", "dog"] and len(folder) == 6 and folder[0][0].shape == (3, 224, 224)

    tiny = tmp_path / "tiny"
    for wnid in ("n01", "n02"):
        for i in range(2):
            picture(tiny / "train" / wnid / "images" / f"{wnid}_{i}.JPEG")
    picture(tiny / "val" / "images" / "val_0.JPEG")
    picture(tiny / "val" / "images" / "val_1.JPEG")
    (tiny / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn02\t0\t0\t1\t1\nval_1.JPEG\tn01\t0\t0\t1\t1\n")
    validation = data.load("tiny-imagenet", "test", tiny)
    assert validation.classes == ["n01", "n02"] and validation.targets.tolist() == [1, 0]
    assert validation[0][0].shape == (3, 64, 64)
    with pytest.raises(ModellegoError, match="train"):
        data.load("imagefolder", "train", tmp_path / "nothing")


def test_a_missing_dataset_names_both_ways_to_point_at_it(tmp_path, monkeypatch):
    monkeypatch.delenv("MODELLEGO_DATA_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModellegoError) as missing:
        data.load("cifar10", "train")
    message = str(missing.value)
    assert "--data-root" in message and "MODELLEGO_DATA_ROOT" in message
    assert f"looked in {tmp_path}/data/cifar10/cifar-10-batches-py" in message
    monkeypatch.setenv("MODELLEGO_DATA_ROOT", str(tmp_path / "datasets"))
    with pytest.raises(ModellegoError, match=f"looked in {tmp_path}/datasets/mnist.*MODELLEGO_DATA_ROOT"):
        data.load("mnist", "test")
    assert len(data.load("fashion-mnist", "test")) == 10000  # not there: Debian's copy, as without the variable


def write_fake_cifar10(root, per_batch: int = 4):
    """torchvision's cifar-10-batches-py layout, pickled batches included, with a few random images each."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.RandomState(0)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"batch_label": name, "data": rng.randint(0, 256, (per_batch, 3072)).astype(np.uint8),
                 "labels": [int(label) for label in rng.randint(0, 10, per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names, "num_vis": 3072}))
    return folder, names


def test_cifar_that_fails_the_checksums_reads_with_no_verify(tmp_path):
    folder, names = write_fake_cifar10(tmp_path)
    with pytest.raises(ModellegoError, match="--no-verify"):
        data.load("cifar10", "train", tmp_path)
    train = data.load("cifar10", "train", tmp_path, verify=False)
    test = data.load("cifar10", "test", tmp_path, verify=False)
    assert len(train) == 20 and len(test) == 4 and train.classes == names
    assert train.images.shape == (20, 3, 32, 32) and train.spec.size == (32, 32)
    first = pickle.loads((folder / "data_batch_1").read_bytes())
    assert torch.equal(train.images[0], torch.from_numpy(first["data"][0].reshape(3, 32, 32)))
    assert train.targets[:4].tolist() == first["labels"]
    (folder / "data_batch_3").unlink()
    with pytest.raises(ModellegoError, match="cannot read"):
        data.load("cifar10", "train", tmp_path, verify=False)


def test_imagefolder_image_size(tmp_path):
    write_image_folder(tmp_path)
    small = data.load("imagefolder", "train", tmp_path, image_size=32)
    assert small[0][0].shape == (3, 32, 32) and small.spec.size == (32, 32)
    assert data.load("tiny-imagenet", "train", tmp_path, image_size=16)[0][0].shape == (3, 16, 16)
    for bad in (4, 2048, 32.5, True):
        with pytest.raises(ModellegoError, match="--image-size must be a whole number of pixels from 8 to 1024"):
            data.load("imagefolder", "train", tmp_path, image_size=bad)
    assert data.load("digits", "train", image_size=28).spec.size == (28, 28)  # its own size is fine
    with pytest.raises(ModellegoError, match="applies to imagefolder and tiny-imagenet only"):
        data.load("digits", "train", image_size=64)


def test_data_root_precedence(tmp_path, monkeypatch):
    from modellego.data.task import data_root_hints, resolve_root

    hint, explicit, env = tmp_path / "hint", tmp_path / "explicit", tmp_path / "env"
    hint.mkdir()
    monkeypatch.delenv("MODELLEGO_DATA_ROOT", raising=False)
    assert resolve_root("imagefolder", explicit, str(hint)) == explicit
    assert resolve_root("imagefolder", None, str(hint)) == str(hint)
    assert resolve_root("imagefolder", None, str(tmp_path / "moved")) is None  # a hint that no longer exists
    monkeypatch.setenv("MODELLEGO_DATA_ROOT", str(env))
    assert resolve_root("imagefolder", None, str(hint)) == str(hint)  # the variable names no such dataset
    (env / "imagefolder").mkdir(parents=True)
    assert resolve_root("imagefolder", None, str(hint)) is None  # `load` reads $MODELLEGO_DATA_ROOT/imagefolder
    assert resolve_root("imagefolder", explicit, str(hint)) == explicit
    nested = {"assembled": {"components": [
        {"provenance": {"disassembled": {"source_provenance": {"trained": {"dataset": "imagefolder",
                                                                          "data_root": "/a"}}}}},
        {"provenance": {"trained": {"dataset": "cifar10", "data_root": None}}}]}}
    assert data_root_hints(nested) == {"imagefolder": "/a"}


def test_naming_the_models_own_folder_dataset_reads_the_same_samples(tmp_path):
    # ImageNet has "Cardigan" (a dog) and "cardigan" (a sweater): matching names without case once gave both of
    # the model's classes the dog's folder and dropped the sweater's images, so every sample position after it
    # pointed at another image than in a run without --data (a component re-fitted on another class's images).
    classes = ["cardigan", "Cardigan", "tabby", "Afghan hound"]
    write_image_folder(tmp_path, classes, per_class=2, size=(16, 16))
    refs = [ClassRef(name, "imagefolder", index) for index, name in enumerate(classes)]
    plain = data.task_data(refs, "train", root=tmp_path, image_size=16)
    named = data.task_data(refs, "train", root=tmp_path, image_size=16, dataset="imagefolder")
    assert len(plain) == len(named) == 8
    assert plain.targets.tolist() == named.targets.tolist()
    assert all(torch.equal(plain[i][0], named[i][0]) for i in range(len(plain)))
    by_label = {int(label): plain.parts[0].positions[i] for i, label in enumerate(plain.targets)}
    folder = data.load("imagefolder", "train", tmp_path, image_size=16)
    assert [folder.classes[folder.targets[int(by_label[k])]] for k in range(4)] == classes


def test_class_names_differing_only_in_case_are_told_apart():
    classes = ["tabby", "Cardigan", "cardigan"]
    assert data.resolve_classes(classes, "Cardigan,cardigan,TABBY") == [1, 2, 0]
    with pytest.raises(ModellegoError, match="matches 'Cardigan', 'cardigan'"):
        data.resolve_classes(classes, "CARDIGAN")
