"""Datasets by name. Every dataset yields unnormalised float images in [0, 1] and integer labels,
and carries `.classes` (names), `.targets` (a LongTensor of labels) and `.spec` (its InputSpec)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from modellego.data.idx import read_idx
from modellego.data.spec import InputSpec
from modellego.errors import ModellegoError

SPLITS = ("train", "test")
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Datasets read from image files, resized to a square size (their default); the others have a fixed size.
RESIZABLE = {"imagefolder": 224, "tiny-imagenet": 64}
IMAGE_SIZE_RANGE = (8, 1024)


class TensorImages(Dataset):
    """An in-memory image dataset: uint8 images N×C×H×W and their labels."""

    def __init__(self, name: str, split: str, images: torch.Tensor, targets: torch.Tensor,
                 classes: list[str], mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.name = name
        self.split = split
        self.images = images
        self.targets = targets.long()
        self.classes = list(classes)
        self.class_indices = list(range(len(classes)))
        self.spec = InputSpec(images.shape[1], (images.shape[2], images.shape[3]), mean, std)
        self.root: Path | None = None  # the folder it was read from when one was given (set by `load`)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].float().div_(255.0), int(self.targets[index])

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        """Batched fetch (used by DataLoader): one indexing op instead of one per sample."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return list(zip(self.images[index].float().div_(255.0), self.targets[index].tolist()))


class FolderImages(Dataset):
    """Images read from files on demand (ImageFolder layouts), resized to a square `size`."""

    reads_files = True  # each read decodes a file: DataLoader workers pay off (modellego.runtime.workers_for)

    def __init__(self, name: str, split: str, samples: list[tuple[str, int]], classes: list[str],
                 size: int, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> None:
        from torchvision import transforms

        self.name = name
        self.split = split
        self.samples = samples
        self.targets = torch.tensor([label for _, label in samples], dtype=torch.long)
        self.classes = list(classes)
        self.class_indices = list(range(len(classes)))
        self.spec = InputSpec(3, (size, size), mean, std)
        self.root: Path | None = None
        self.transform = transforms.Compose([
            transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(),
        ])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from torchvision.datasets.folder import default_loader

        path, label = self.samples[index]
        return self.transform(default_loader(path)), label


def _missing(name: str, looked: Path | list[Path], how: str) -> ModellegoError:
    where = ", ".join(str(folder) for folder in looked) if isinstance(looked, list) else str(looked)
    return ModellegoError(f"dataset '{name}' not found: looked in {where}; {how}; pass --data-root FOLDER "
                          f"or set MODELLEGO_DATA_ROOT (read as $MODELLEGO_DATA_ROOT/{name})")


def _idx_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _load_idx_pair(name: str, split: str, folders: list[Path], how: str) -> tuple[torch.Tensor, torch.Tensor]:
    prefix = "train" if split == "train" else "t10k"
    for folder in folders:
        images = _idx_file(folder, f"{prefix}-images-idx3-ubyte")
        labels = _idx_file(folder, f"{prefix}-labels-idx1-ubyte")
        if images and labels:
            pixels = torch.from_numpy(read_idx(images).copy()).unsqueeze(1)
            targets = torch.from_numpy(read_idx(labels).astype(np.int64))
            if len(pixels) != len(targets):
                raise ModellegoError(f"{images} and {labels} disagree on the number of samples")
            return pixels, targets
    raise _missing(name, folders, how)


def _fashion_mnist(split: str, root: Path | None) -> Dataset:
    env = os.environ.get("MODELLEGO_DATA_ROOT")
    if root is None and env:
        root = Path(env) / "fashion-mnist"
        folders = [root, root / "FashionMNIST" / "raw", FASHION_MNIST_ROOT]
    else:
        folders = [root, root / "FashionMNIST" / "raw"] if root else [FASHION_MNIST_ROOT]
    how = "install it with `apt-get install dataset-fashion-mnist` or point to a folder holding its four IDX files"
    images, targets = _load_idx_pair("fashion-mnist", split, folders, how)
    return TensorImages("fashion-mnist", split, images, targets, FASHION_MNIST_CLASSES, (0.2860,), (0.3530,))


def _mnist(split: str, root: Path | None) -> Dataset:
    base = _require_root("mnist", root)
    folders = [base, base / "MNIST" / "raw", base / "raw"]
    how = "it needs torchvision's MNIST layout (MNIST/raw/*-ubyte[.gz])"
    images, targets = _load_idx_pair("mnist", split, folders, how)
    return TensorImages("mnist", split, images, targets, [str(d) for d in range(10)], (0.1307,), (0.3081,))


def _digits(split: str, root: Path | None) -> Dataset:
    """scikit-learn's bundled 8×8 digits, drawn as a 20×20 digit in a 28×28 frame like MNIST; a fixed
    stratified 80/20 split (seed 0) gives train and test."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    pixels = F.pad(F.interpolate(pixels, size=(20, 20), mode="bilinear", align_corners=False), (4, 4, 4, 4))
    images = (pixels.clamp(0, 1) * 255).round().to(torch.uint8)
    targets = torch.tensor(bunch.target, dtype=torch.long)
    generator = np.random.RandomState(0)
    test_mask = np.zeros(len(targets), dtype=bool)
    for label in range(10):
        members = np.flatnonzero(bunch.target == label)
        test_mask[generator.permutation(members)[: len(members) // 5]] = True
    chosen = torch.from_numpy(test_mask if split == "test" else ~test_mask)
    return TensorImages("digits", split, images[chosen], targets[chosen], [str(d) for d in range(10)],
                        (0.1557,), (0.2773,))


def _cifar(name: str, split: str, root: Path | None, verify: bool = True) -> Dataset:
    from torchvision.datasets import CIFAR10, CIFAR100

    base = _require_root(name, root)
    cls, folder, mean, std = {
        "cifar10": (CIFAR10, "cifar-10-batches-py", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
        "cifar100": (CIFAR100, "cifar-100-python", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    }[name]
    if not (base / folder).is_dir():
        raise _missing(name, base / folder, f"unpack the official python-version archive under {base}")
    if not verify:
        images, targets, classes = _read_cifar_batches(name, base / folder, cls, split)
        return TensorImages(name, split, images, targets, classes, mean, std)
    try:
        data = cls(str(base), train=(split == "train"), download=False)
    except RuntimeError:
        raise ModellegoError(f"dataset '{name}' under {base / folder} is incomplete or corrupt (torchvision's "
                             "checksums do not match); unpack the official python-version archive again, or pass "
                             "--no-verify to read your own copy without the checksums") from None
    images = torch.from_numpy(data.data).permute(0, 3, 1, 2).contiguous()
    return TensorImages(name, split, images, torch.tensor(data.targets), list(data.classes), mean, std)


def _read_cifar_batches(name: str, folder: Path, cls: type, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The images (N×3×32×32 uint8), labels and class names of a CIFAR folder in torchvision's layout, read
    without torchvision's MD5 checks (the user asked for it: a subset or a re-packed copy of their own)."""
    images, labels = [], []
    try:
        for file_name, _ in (cls.train_list if split == "train" else cls.test_list):
            with open(folder / file_name, "rb") as handle:
                entry = pickle.load(handle, encoding="latin1")  # the official format is pickled batches
            images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(int(label) for label in (entry["labels"] if "labels" in entry else entry["fine_labels"]))
        with open(folder / cls.meta["filename"], "rb") as handle:
            classes = [str(label) for label in pickle.load(handle, encoding="latin1")[cls.meta["key"]]]
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, ValueError, TypeError, AttributeError) as error:
        raise ModellegoError(f"dataset '{name}': cannot read {folder} ({type(error).__name__}: {error})") from None
    pixels = torch.from_numpy(np.concatenate(images))
    targets = torch.tensor(labels, dtype=torch.long)
    if len(pixels) != len(targets) or (len(targets) and not 0 <= int(targets.min()) <= int(targets.max()) < len(classes)):
        raise ModellegoError(f"dataset '{name}': {folder} holds {len(pixels)} images but {len(targets)} labels, "
                             f"or labels outside its {len(classes)} classes")
    return pixels, targets, classes


def _folder_samples(name: str, folder: Path) -> tuple[list[tuple[str, int]], list[str]]:
    from torchvision.datasets import ImageFolder

    try:
        folder_data = ImageFolder(str(folder))
    except (FileNotFoundError, OSError) as error:
        raise ModellegoError(f"dataset '{name}': cannot read image folder {folder}: {error}") from None
    return list(folder_data.samples), list(folder_data.classes)


def _split_folder(name: str, base: Path, split: str) -> Path:
    candidates = [base / "train"] if split == "train" else [base / "test", base / "val"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise _missing(name, candidates[0], f"{name} needs {base}/train and {base}/test (or {base}/val) "
                   "with one sub-folder of images per class")


def _imagefolder(split: str, root: Path | None, size: int = RESIZABLE["imagefolder"]) -> Dataset:
    base = _require_root("imagefolder", root)
    samples, classes = _folder_samples("imagefolder", _split_folder("imagefolder", base, split))
    return FolderImages("imagefolder", split, samples, classes, size)


def _tiny_imagenet(split: str, root: Path | None, size: int = RESIZABLE["tiny-imagenet"]) -> Dataset:
    """Tiny-ImageNet as distributed (train/<wnid>/images, val/images + val_annotations.txt) or any
    ImageFolder layout with train/ and val/ (or test/)."""
    base = _require_root("tiny-imagenet", root)
    train_samples, classes = _folder_samples("tiny-imagenet", _split_folder("tiny-imagenet", base, "train"))
    if split == "train":
        return FolderImages("tiny-imagenet", split, train_samples, classes, size)
    annotations = base / "val" / "val_annotations.txt"
    if annotations.is_file():
        index = {wnid: position for position, wnid in enumerate(classes)}
        samples = []
        for line in annotations.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 2 and parts[1] in index:
                samples.append((str(base / "val" / "images" / parts[0]), index[parts[1]]))
        return FolderImages("tiny-imagenet", split, samples, classes, size)
    samples, test_classes = _folder_samples("tiny-imagenet", _split_folder("tiny-imagenet", base, split))
    if test_classes != classes:
        raise ModellegoError(f"tiny-imagenet: the class folders of {base}/train and its test split differ")
    return FolderImages("tiny-imagenet", split, samples, classes, size)


def _require_root(name: str, root: Path | None) -> Path:
    if root is not None:
        return root
    env = os.environ.get("MODELLEGO_DATA_ROOT")
    base = Path(env) / name if env else Path.cwd() / "data" / name
    return base


LOADERS: dict[str, Callable[..., Dataset]] = {
    "fashion-mnist": _fashion_mnist,
    "digits": _digits,
    "mnist": _mnist,
    "cifar10": lambda split, root, verify=True: _cifar("cifar10", split, root, verify),
    "cifar100": lambda split, root, verify=True: _cifar("cifar100", split, root, verify),
    "imagefolder": _imagefolder,
    "tiny-imagenet": _tiny_imagenet,
}


def dataset_names() -> list[str]:
    """The names `load` accepts."""
    return list(LOADERS)


def check_image_size(image_size: int) -> int:
    """Refuse an image size that is not a whole number of pixels in IMAGE_SIZE_RANGE."""
    low, high = IMAGE_SIZE_RANGE
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not low <= image_size <= high:
        raise ModellegoError(f"--image-size must be a whole number of pixels from {low} to {high}, got {image_size!r}")
    return image_size


def load(name: str, split: str = "train", root: str | os.PathLike | None = None, image_size: int | None = None,
         verify: bool = True) -> Dataset:
    """Load dataset `name` (see `dataset_names()`), split 'train' or 'test', from local files only.

    `root` overrides where the files are looked for; without it, Fashion-MNIST is read from
    `$MODELLEGO_DATA_ROOT/fashion-mnist` or Debian's package and the others from `$MODELLEGO_DATA_ROOT/<name>`
    or `./data/<name>`. Nothing is downloaded. `image_size` resizes imagefolder / tiny-imagenet images to a
    square (default 224 / 64); other datasets accept only their own size. `verify=False` reads CIFAR folders
    that fail torchvision's checksums. The dataset's `.root` is the absolute `root`, or None.
    """
    if name not in LOADERS:
        raise ModellegoError(f"unknown dataset '{name}'; choose one of {', '.join(LOADERS)}")
    if split not in SPLITS:
        raise ModellegoError(f"unknown split '{split}'; choose 'train' or 'test'")
    if image_size is not None:
        check_image_size(image_size)
    base = Path(root).expanduser() if root is not None else None
    if name in RESIZABLE:
        dataset = LOADERS[name](split, base, image_size or RESIZABLE[name])
    elif name.startswith("cifar"):
        dataset = LOADERS[name](split, base, verify)
    else:
        dataset = LOADERS[name](split, base)
    if image_size is not None and tuple(dataset.spec.size) != (image_size, image_size):
        height, width = dataset.spec.size
        raise ModellegoError(f"dataset '{name}' has {height}×{width} images, not {image_size}×{image_size}; "
                             f"--image-size applies to {' and '.join(RESIZABLE)} only")
    dataset.root = base.resolve() if base is not None else None
    return dataset
