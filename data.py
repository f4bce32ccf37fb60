"""Image datasets behind one function, `build_dataset`, each item a uint8 (C, H, W) tensor and a label.

    fashion-mnist  the embedded default: the standard gzipped idx files, from --data-dir or
                   Debian's dataset-fashion-mnist package (apt-get install dataset-fashion-mnist)
    cifar10        --data-dir holding cifar-10-batches-py/ (the "python version" from the CIFAR site)
    cifar100       --data-dir holding cifar-100-python/ (fine labels)
    in1k           --data-dir with train/ and val/ class folders (ImageNet's usual layout), 224 px
    imagefolder    the same layout for any labelled image set
    images         a plain folder of images, searched recursively, no labels (pretraining only)

Normalisation happens on the device, inside the models, so loaders ship uint8.
"""

import gzip
import math
import os
import pickle
import subprocess
import sys
import warnings
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, default_collate
from torchvision import datasets
from torchvision.transforms import v2
from tqdm import tqdm

from engine import UserError

FILE_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}  # --in-chans: PIL mode image files are converted to
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
FASHION_MNIST_DEBIAN = "/usr/share/datasets/fashion-mnist"


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know of a dataset."""

    in_chans: int
    img_size: int  # square side, pixels
    num_classes: int  # 0 for unlabelled data
    mean: tuple
    std: tuple


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DATASETS = {
    "fashion-mnist": DataInfo(1, 28, 10, (0.2860,), (0.3530,)),
    "cifar10": DataInfo(3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DataInfo(3, 32, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "in1k": DataInfo(3, 224, 1000, IMAGENET_MEAN, IMAGENET_STD),
    "imagefolder": DataInfo(3, 224, 0, IMAGENET_MEAN, IMAGENET_STD),  # classes counted on load
    "images": DataInfo(3, 224, 0, IMAGENET_MEAN, IMAGENET_STD),
}


def data_info(name, img_size=None, in_chans=None, mean=(), std=()):
    """The dataset's defaults, with --img-size, --in-chans, --mean and --std overrides."""
    if name not in DATASETS:
        raise UserError(f"unknown --data {name!r}, expected one of {list(DATASETS)}")
    info = DATASETS[name]
    chans = in_chans or info.in_chans
    check_stats(mean, std)
    if mean or std:
        if not len(mean) == len(std) == chans:
            raise UserError(f"--mean {list(mean)} and --std {list(std)}: give one value per input channel, {chans}, "
                            "each flag repeated")
        return DataInfo(chans, img_size or info.img_size, info.num_classes, tuple(mean), tuple(std))
    mean, std = info.mean, info.std
    if chans != info.in_chans:  # e.g. grayscale ImageNet: average the per-channel statistics
        mean, std = (sum(mean) / len(mean),) * chans, (sum(std) / len(std),) * chans
    return DataInfo(chans, img_size or info.img_size, info.num_classes, mean, std)


def check_stats(mean, std):
    """--mean and --std normalise as (x - mean) / std: each must be finite, and std > 0."""
    bad = [f"--mean {m}" for m in mean if not math.isfinite(m)]
    bad += [f"--std {s}" for s in std if not (math.isfinite(s) and s > 0)]
    if bad:
        raise UserError(f"{', '.join(bad)}: inputs are normalised as (x - mean) / std, so each --mean must be finite "
                        "and each --std finite and > 0")


# ---------------------------------------------------------------- in-memory sets


class TensorImages(Dataset):
    """Images held in memory as one uint8 tensor (N, C, H, W), with labels (N,)."""

    def __init__(self, images, labels, transform=None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x = self.images[i]
        return (self.transform(x) if self.transform else x), int(self.labels[i])


def read_idx(path):
    """A gzipped idx file (the MNIST format) as a numpy array."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:  # not gzip (gzip.BadGzipFile is an OSError), cut short, or corrupt
        raise UserError(
            f"{path} is not a whole gzip file ({type(e).__name__}: {e}); idx files are read gzipped, as published"
        ) from None
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise UserError(f"{path} is not an idx file of unsigned bytes (magic {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != np.prod(shape):
        raise UserError(f"{path} holds {body.size} bytes, its header promises {shape}")
    return body.reshape(shape)


def fashion_mnist_dir(data_dir):
    """--data-dir if given, else where Debian's dataset-fashion-mnist installs the files."""
    if data_dir:
        return Path(data_dir)
    if Path(FASHION_MNIST_DEBIAN).is_dir():
        return Path(FASHION_MNIST_DEBIAN)
    try:  # the package may one day install elsewhere
        listing = subprocess.run(["dpkg", "-L", "dataset-fashion-mnist"], capture_output=True, text=True).stdout
        return next(Path(p).parent for p in listing.split() if p.endswith("train-images-idx3-ubyte.gz"))
    except (OSError, StopIteration):
        raise UserError(
            "Fashion-MNIST not found: pass --data-dir with the four *-idx?-ubyte.gz files, "
            "or install Debian's package: apt-get install dataset-fashion-mnist"
        ) from None


def load_fashion_mnist(data_dir, split):
    root = fashion_mnist_dir(data_dir)
    prefix = "train" if split == "train" else "t10k"
    paths = [root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"]
    for p in paths:
        if not p.is_file():
            raise UserError(f"{p} not found: Fashion-MNIST expects {[q.name for q in paths]} in {root}")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or len(images) != len(labels):
        raise UserError(f"{paths[0]}: expected (N, 28, 28) images and N labels, got {images.shape} and {labels.shape}")
    return torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels.astype(np.int64))


def load_cifar(data_dir, split, classes):
    folder, label_key = ("cifar-10-batches-py", b"labels") if classes == 10 else ("cifar-100-python", b"fine_labels")
    root = Path(data_dir or ".") / folder
    if classes == 10:
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    else:
        names = [split if split == "train" else "test"]
    batches = []
    for name in names:
        path = root / name
        if not path.is_file():
            raise UserError(f"{path} not found: --data-dir must hold {folder}/ with {names} "
                            "(the CIFAR 'python version')")
        batches.append(read_cifar_batch(path, label_key))
    images, labels = zip(*batches)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def read_cifar_batch(path, label_key):
    """One pickle of CIFAR's python version -> images uint8 (n, 3, 32, 32), labels (n,); UserError naming the
    file when it is cut short, lacks b"data" or `label_key`, or holds rows other than 3 x 32 x 32 bytes."""
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")  # the format CIFAR is published in
    except Exception as e:  # a cut-short or foreign pickle fails in many ways
        raise UserError(f"{path} is not a readable CIFAR pickle ({type(e).__name__}: {e})") from None
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        keys = list(batch) if isinstance(batch, dict) else type(batch).__name__
        raise UserError(f"{path} lacks b'data' or {label_key!r}: not a CIFAR batch of this dataset (it holds {keys})")
    images, labels = np.asarray(batch[b"data"]), np.asarray(batch[label_key])
    if images.ndim != 2 or images.shape[1] != 3 * 32 * 32 or labels.shape != (len(images),):
        raise UserError(
            f"{path}: expected rows of 3072 bytes (3 x 32 x 32) and one label each, "
            f"got data of shape {images.shape} and {labels.size} labels"
        )
    return images.astype(np.uint8).reshape(-1, 3, 32, 32), labels.astype(np.int64)


# ---------------------------------------------------------------- folders


class BadImageFile(UserError):
    """An image file that cannot be read; the message names it."""


SKIP_HINT = "; --skip-bad-files skips such files"


def full_range(img):
    """A 16-bit ("I;16*", "I") or float ("F", taken as [0, 1]) grayscale image as 8-bit "L" over its full range, where
    PIL's convert() would clip to 0..255 and read most pixels as white; other modes are returned as they are."""
    if img.mode.startswith("I"):
        pixels = np.asarray(img).astype(np.int64) >> 8  # 0..65535 -> 0..255
    elif img.mode == "F":
        pixels = (np.asarray(img) * 255).round()
    else:
        return img
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def read_image_file(path, mode, skippable=False):
    """The file at `path` decoded in full and converted to `mode`, the one reader of image files here; BadImageFile
    when it is missing, truncated or not an image (naming --skip-bad-files if skippable)."""
    try:
        with Image.open(path) as img, warnings.catch_warnings():
            warnings.filterwarnings("ignore", "(?i).*exif")  # a camera's odd EXIF would print inside the progress bar
            return full_range(img).convert(mode)  # both decode every pixel, so a truncated file fails here
    except (OSError, ValueError, SyntaxError) as e:  # PIL's UnidentifiedImageError is an OSError
        hint = SKIP_HINT if skippable else ""
        raise BadImageFile(f"{path} is not a readable image ({type(e).__name__}: {e}){hint}") from None


def read_image(path, mode, size=None):
    """An image file as uint8 (C, H, W) in PIL `mode`; with size = (H, W), centre-cropped to its aspect
    ratio and resized to it (bicubic)."""
    img = read_image_file(path, mode)
    if size is not None:
        img = ImageOps.fit(img, (size[1], size[0]), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(img)).reshape(img.height, img.width, -1).permute(2, 0, 1)


class ImageFiles(Dataset):
    """Image files, unlabelled (label -1), for pretraining on one's own data."""

    def __init__(self, files, mode, transform):
        self.files, self.mode, self.transform = files, mode, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return self.transform(read_image_file(self.files[i], self.mode, skippable=True)), -1


class SkipBadFiles(Dataset):
    """--skip-bad-files: an unreadable image file's item is the next readable one, so batches stay full and every
    rank steps as one. Each file is reported on stderr the first time it is met, with the count so far; `bad` is in
    shared memory, so the count is the process's, its loader workers' included."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.bad = torch.zeros(len(dataset), dtype=torch.bool).share_memory_()

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        n = len(self)
        for j in range(i, i + n):
            try:
                return self.dataset[j % n]
            except BadImageFile as e:
                self.report(j % n, e)
        raise UserError(f"all {n} image files are unreadable: --skip-bad-files has nothing left to read")

    def report(self, index, error):
        if not self.bad[index]:
            self.bad[index] = True
            message = str(error).removesuffix(SKIP_HINT)
            tqdm.write(f"--skip-bad-files: {message}; skipped ({int(self.bad.sum())} unreadable so far)", sys.stderr)


def hidden(path, root):
    """A file or folder below root whose name starts with "." (macOS's ._ twins, .ipynb_checkpoints): not data."""
    return any(part.startswith(".") for part in Path(path).relative_to(root).parts)


def is_image(path, root):
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS and not hidden(path, root)


class ImageFolder(datasets.ImageFolder):
    """torchvision's, blind to hidden files and folders."""

    def __init__(self, root, transform, loader):
        super().__init__(root, transform, loader=loader, is_valid_file=partial(is_image, root=root))

    def find_classes(self, directory):
        classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise FileNotFoundError(f"no class folder in {directory}")
        return classes, {c: i for i, c in enumerate(classes)}


def image_files(root, split, mode, transform):
    """Every image below root, searched recursively; every 50th file (by name) is held out as val."""
    files = sorted(p for p in Path(root).rglob("*") if is_image(p, root))
    if len(files) < 2:
        raise UserError(f"found {len(files)} images ({', '.join(IMAGE_EXTENSIONS)}) below {root}, need at least 2")
    held_out = set(range(0, len(files), 50))
    return ImageFiles([f for i, f in enumerate(files) if (i in held_out) == (split == "val")], mode, transform)


def image_folder(root, mode, transform):
    """train/ or val/ of an ImageNet-style tree: one sub-folder per class."""
    if not Path(root).is_dir():
        raise UserError(f"{root} not found: expected class sub-folders in {Path(root).parent}/train and /val")
    try:
        return ImageFolder(root, transform, loader=partial(read_image_file, mode=mode, skippable=True))
    except (FileNotFoundError, RuntimeError) as e:  # no class folders, or no images in them
        raise UserError(f"{root}: expected one sub-folder of images per class ({e})") from None


def check_val_classes(val_set, train_root):
    """train/ names and numbers the classes (its sorted folder names, as ImageFolder's); val/ must have
    the same folders, or its labels would number other classes."""
    train_root = Path(train_root)
    folders = train_root.iterdir() if train_root.is_dir() else ()
    train_classes = {p.name for p in folders if p.is_dir() and not hidden(p, train_root)}
    extra, missing = sorted(set(val_set.classes) - train_classes), sorted(train_classes - set(val_set.classes))
    if extra or missing:
        raise UserError(
            f"{val_set.root}: its class folders must be those of {train_root}; extra {extra}, missing {missing}"
        )


# ---------------------------------------------------------------- one entry point


BICUBIC = v2.InterpolationMode.BICUBIC  # MAE's, DeiT's and timm's resizing (interpolation=3) in every recipe here


def pretrain_transform(info, name):
    """Pretraining augmentation: MAE's random resized crop and flip for large photos, flip alone for small sets."""
    if name in ("in1k", "imagefolder", "images"):
        crop = v2.RandomResizedCrop(info.img_size, scale=(0.2, 1.0), interpolation=BICUBIC, antialias=True)
        return v2.Compose([crop, v2.RandomHorizontalFlip(), v2.PILToTensor()])
    return v2.Compose([*resize_if_needed(info, name), v2.RandomHorizontalFlip()])


def eval_transform(info, name):
    """Held-out images: resize to 1/0.875 and centre crop (DeiT) for photos, resize only for small sets."""
    if name in ("in1k", "imagefolder", "images"):
        resize = v2.Resize(int(info.img_size / 0.875), interpolation=BICUBIC, antialias=True)
        return v2.Compose([resize, v2.CenterCrop(info.img_size), v2.PILToTensor()])
    return v2.Compose(resize_if_needed(info, name) or [v2.Identity()])


def resize_if_needed(info, name):
    """Small in-memory sets are used at their native size unless --img-size asks otherwise."""
    if info.img_size == DATASETS[name].img_size:
        return []
    return [v2.Resize(info.img_size, interpolation=BICUBIC, antialias=True)]


def finetune_transform(info, name, randaug_n, randaug_m, reprob):
    """DeiT's finetuning augmentation, torchvision's ops on uint8: random resized crop for photos
    (random crop with 1/8 padding for small sets), flip, RandAugment(n, m), RandomErasing(p)."""
    if name in ("in1k", "imagefolder"):
        resized_crop = v2.RandomResizedCrop(info.img_size, interpolation=BICUBIC, antialias=True)
        crop = [resized_crop, v2.RandomHorizontalFlip(), v2.PILToTensor()]
    else:
        padded_crop = v2.RandomCrop(info.img_size, padding=info.img_size // 8)
        crop = [*resize_if_needed(info, name), padded_crop, v2.RandomHorizontalFlip()]
    augment = [v2.RandAugment(randaug_n, randaug_m)] if randaug_n else []
    erase = [v2.RandomErasing(reprob)] if reprob else []
    return v2.Compose([*crop, *augment, *erase])


def mix_collate(mixup, cutmix, num_classes):
    """DeiT's MixUp / CutMix, one of them per batch, as a training collate_fn; None when both are off. Labels become
    soft targets (B, classes), images floats in [0, 1] to be blended."""
    kinds = ((v2.MixUp, mixup), (v2.CutMix, cutmix))
    mixes = [mix(alpha=alpha, num_classes=num_classes) for mix, alpha in kinds if alpha > 0]
    return partial(mix_batch, mix=v2.RandomChoice(mixes)) if mixes else None


def mix_batch(batch, mix):
    images, labels = default_collate(batch)  # (B, C, H, W) uint8, (B,)
    return mix(images.float() / 255, labels)


def build_dataset(name, data_dir, split, info, transform):
    """The `split` ("train" or "val") of dataset `name`, items (uint8 (C, H, W), label)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    if data_dir and not os.path.isdir(data_dir):
        raise UserError(f"--data-dir {data_dir} is not a folder")
    if name in ("fashion-mnist", "cifar10", "cifar100"):
        if info.in_chans != DATASETS[name].in_chans:
            raise UserError(f"--in-chans {info.in_chans}: {name} images have {DATASETS[name].in_chans} channel(s)")
        if name == "fashion-mnist":
            return TensorImages(*load_fashion_mnist(data_dir, split), transform)
        return TensorImages(*load_cifar(data_dir, split, 10 if name == "cifar10" else 100), transform)
    if not data_dir:
        raise UserError(f"--data {name} needs --data-dir")
    if info.in_chans not in FILE_MODES:
        modes = ", ".join(f"{c} ({m})" for c, m in FILE_MODES.items())
        raise UserError(f"--in-chans {info.in_chans}: image files are read as {modes} channels; for other counts, "
                        "train from a Dataset of uint8 (C, H, W) tensors in your own code")
    mode = FILE_MODES[info.in_chans]
    if name == "images":
        dataset = image_files(data_dir, split, mode, transform)
    elif name in ("in1k", "imagefolder"):
        dataset = image_folder(Path(data_dir) / split, mode, transform)
        if split == "val":
            check_val_classes(dataset, Path(data_dir) / "train")
    else:
        raise UserError(f"unknown --data {name!r}, expected one of {list(DATASETS)}")
    return dataset
