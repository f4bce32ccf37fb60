"""Bad input to the data layer (issue #20), as a new user gives it: each case stops with one line naming
the file or flag, before anything is written, or is read in full. `python3 -m pytest -q test_faults.py`"""

import gzip
import math
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
from conftest import TINY_RUN, invoke, one_line_error, photo_folder, refused


def snapshot(folder):
    """Every file below folder -> its bytes, to show that a refused run lost nothing."""
    return {p: p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture
def finished_run(fake_fmnist, tmp_path):
    """A 1-epoch pretraining run on fake_fmnist: the command line that continues it, and its output folder."""
    common = ["pretrain", "--data-dir", fake_fmnist, *TINY_RUN, "--out-dir", tmp_path / "run"]
    assert invoke(*common, "--epochs", 1).exit_code == 0
    return [*common, "--epochs", 2], tmp_path / "run"


# ---------------------------------------------------------------- image folders


def class_folders(root, splits):
    """An ImageNet-style tree: {split: class names} -> two small JPEGs per class folder."""
    for split, classes in splits.items():
        for name in classes:
            photo_folder(root / split / name, 2)
    return root


def test_val_classes_must_be_the_class_folders_of_train(tmp_path):
    root = class_folders(tmp_path / "tree", {"train": "abc", "val": "ax"})
    result = invoke(
        "pretrain", "--data", "imagefolder", "--data-dir", root, "--img-size", 32, "--patch-size", 8, "--preset",
        "vit_test", "--pairs", 16, "--batch-size", 2, "--epochs", 1, "--out-dir", tmp_path / "run",
    )
    assert one_line_error(result, str(root / "val"), "extra ['x']", "missing ['b', 'c']")
    assert not (tmp_path / "run").exists()
    root = class_folders(tmp_path / "short", {"train": "abc", "val": "ac"})
    info = data.data_info("imagefolder")
    refused(lambda: data.build_dataset("imagefolder", str(root), "val", info, None), "missing ['b']")
    (root / "val" / "b").mkdir()
    Image.new("RGB", (8, 8)).save(root / "val" / "b" / "0.png")
    val_set = data.build_dataset("imagefolder", str(root), "val", info, None)
    assert val_set.class_to_idx == {"a": 0, "b": 1, "c": 2} and val_set[-1][1] == 2


def test_hidden_files_and_folders_are_not_data(tmp_path):
    root = class_folders(tmp_path / "tree", {"train": "ab", "val": "ab"})
    for split in ("train", "val"):
        (root / split / "a" / "._img_000.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS's twin
        photo_folder(root / split / ".ipynb_checkpoints", 1)
    info = data.data_info("imagefolder")
    train = data.build_dataset("imagefolder", str(root), "train", info, None)
    assert train.classes == ["a", "b"] and len(train) == 4 and all(train[i][0].size == (32, 32) for i in range(4))
    flat = photo_folder(tmp_path / "flat", 50)
    (flat / "._img_000.jpg").write_bytes(b"\x00\x05\x16\x07")
    photo_folder(flat / ".trash", 3)
    val = data.build_dataset("images", str(flat), "val", data.data_info("images"), lambda img: img)
    assert [f.name for f in val.files] == ["img_000.jpg"]  # the 1st of 50 visible files, not the ._ twin


def test_exif_warnings_do_not_reach_the_progress_bar(tmp_path, monkeypatch):
    path = photo_folder(tmp_path / "photos", 1) / "img_000.jpg"
    full_range = data.full_range

    def warns(img):
        warnings.warn("Possibly corrupt EXIF data.  Expecting to read 12 bytes but only got 2.", UserWarning)
        return full_range(img)

    monkeypatch.setattr(data, "full_range", warns)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        data.read_image_file(path, "RGB")
    assert seen == []


class SomeUnreadable(torch.utils.data.Dataset):
    """Items 0..n-1 (the index itself); reading those in `bad` raises BadImageFile naming item i."""

    def __init__(self, n, bad):
        self.n, self.bad = n, bad

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i in self.bad:
            raise data.BadImageFile(f"item{i}.jpg is not a readable image{data.SKIP_HINT}")
        return i


def test_skip_bad_files_serves_the_next_readable_item_and_names_each_file_once(capsys):
    items = data.SkipBadFiles(SomeUnreadable(5, bad={1, 2, 4}))
    assert [items[i] for i in range(5)] == [0, 3, 3, 3, 0] and [items[i] for i in range(5)] == [0, 3, 3, 3, 0]
    lines = capsys.readouterr().err.splitlines()  # each once, though met again
    assert lines == [f"--skip-bad-files: item{i}.jpg is not a readable image; skipped ({n} unreadable so far)"
                     for n, i in enumerate((1, 2, 4), 1)]
    refused(lambda: data.SkipBadFiles(SomeUnreadable(3, bad={0, 1, 2}))[1], "all 3 image files are unreadable")


def gradient_image(mode):
    """A (2, 256) grey ramp 0..255 stored in PIL mode `mode`, with the file suffix that keeps that mode."""
    ramp = np.arange(256, dtype=np.uint8)[None].repeat(2, 0)
    grey = Image.fromarray(ramp)
    if mode == "I;16":
        return Image.fromarray(ramp.astype(np.uint16) * 257), ".png"  # 16-bit PNG: 0..65535
    if mode == "I":
        return Image.fromarray(ramp.astype(np.int32) * 257), ".tif"
    if mode == "F":
        return Image.fromarray(ramp.astype(np.float32) / 255), ".tif"  # floats in [0, 1]
    if mode == "P":
        image = Image.fromarray(ramp, "P")
        image.putpalette([v for i in range(256) for v in (i, i, i)])
        return image, ".png"
    if mode == "LA":
        return Image.merge("LA", (grey, Image.new("L", grey.size, 128))), ".png"
    black = Image.new("L", grey.size, 0)
    return Image.merge("CMYK", (black, black, black, Image.fromarray(255 - ramp))), ".tif"


@pytest.mark.parametrize("mode", ["I;16", "I", "F", "P", "LA", "CMYK"])
def test_image_files_of_any_mode_read_over_their_full_range(tmp_path, mode):
    image, suffix = gradient_image(mode)
    path = tmp_path / f"ramp{suffix}"
    image.save(path)
    with Image.open(path) as stored:
        assert stored.mode == mode
    ramp = np.arange(256, dtype=np.uint8)
    assert (np.asarray(data.read_image_file(path, "L")) == ramp).all()
    assert (np.asarray(data.read_image_file(path, "RGB")) == ramp[:, None]).all()


# ---------------------------------------------------------------- Fashion-MNIST and CIFAR


def uncompressed(path):
    path.write_bytes(gzip.decompress(path.read_bytes()))


def cut_short(path):
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])


def test_fashion_mnist_files_that_are_not_whole_gzip_files_are_named(fake_fmnist, finished_run):
    command, out_dir = finished_run
    before = snapshot(out_dir)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        path, original = fake_fmnist / name, (fake_fmnist / name).read_bytes()
        for corrupt in (uncompressed, cut_short):
            corrupt(path)
            assert one_line_error(invoke(*command), str(path), "gzip"), (name, corrupt)
            path.write_bytes(original)
    assert snapshot(out_dir) == before


CIFAR_ROWS = np.zeros((3, 3072), np.uint8)  # three black 32 x 32 images, one row each
CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]),
    "cifar100": ("cifar-100-python", ["train", "test"]),
}


def write_cifar(root, name, batch):
    """The pickles of CIFAR's python version, each holding the dict `batch` -> the first one's path."""
    folder, files = CIFAR_FILES[name]
    (root / folder).mkdir(parents=True)
    for file in files:
        (root / folder / file).write_bytes(pickle.dumps(batch))
    return root / folder / files[0]


@pytest.mark.parametrize(
    "name, batch, needle",
    [
        ("cifar10", {b"data": CIFAR_ROWS}, "b'labels'"),
        ("cifar100", {b"data": CIFAR_ROWS, b"labels": [0, 1, 2]}, "b'fine_labels'"),
        ("cifar10", {b"data": np.zeros((3, 3000), np.uint8), b"labels": [0, 1, 2]}, "3072"),
        ("cifar10", {b"data": CIFAR_ROWS, b"labels": [0, 1]}, "2 labels"),
    ],
)
def test_cifar_pickles_without_labels_or_of_other_rows_are_named(tmp_path, name, batch, needle):
    first = write_cifar(tmp_path, name, batch)
    refused(lambda: data.build_dataset(name, str(tmp_path), "train", data.data_info(name), None), first, needle)


def test_a_truncated_cifar_pickle_is_named(tmp_path):
    write_cifar(tmp_path, "cifar10", {b"data": CIFAR_ROWS, b"labels": [0, 1, 2]})
    test_batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    cut_short(test_batch)
    info = data.data_info("cifar10")
    assert len(data.build_dataset("cifar10", str(tmp_path), "train", info, None)) == 15
    refused(lambda: data.build_dataset("cifar10", str(tmp_path), "val", info, None), test_batch, "CIFAR")


# ---------------------------------------------------------------- input statistics


def test_statistics_that_cannot_normalise_are_refused_before_training(finished_run):
    command, out_dir = finished_run
    before = snapshot(out_dir)
    for mean, std, flag in (
        (0.5, 0.0, "--std 0.0"), (0.5, -0.2, "--std -0.2"), (float("nan"), 0.3, "--mean nan"),
        (0.5, float("inf"), "--std inf"),
    ):
        result = invoke(*command, "--mean", mean, "--std", std)
        if math.isfinite(mean) and math.isfinite(std):
            assert one_line_error(result, flag), flag
        else:  # refused as the flag is parsed, as every float flag refuses NaN and infinities
            name, value = flag.split()
            assert result.exit_code == 2 and f"'{name}': {value} is not a finite number" in result.output, result.output
        refused(lambda: data.data_info("fashion-mnist", mean=(mean,), std=(std,)), flag)
    assert snapshot(out_dir) == before
