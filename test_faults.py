"""Bad input to the data layer (issue #20), as a new user gives it: each case stops with one line naming
the file or flag, before anything is written, or is read in full. `python3 -m pytest -q test_faults.py`"""

import gzip
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import detect
import sleep1d
import test_detect
import test_sleep1d
from conftest import TINY_RUN, invoke, write_coco
from test_cli import one_line_error, photo_folder


def refused(call, *needles):
    """call() raises data.DataError with a one-line message holding every needle."""
    with pytest.raises(data.DataError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message and all(str(n) in message for n in needles), message


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


# ---------------------------------------------------------------- COCO annotations and channels (detect.py)


def edit_annotations(root, split, edit):
    """edit(the parsed json) of annotations/instances_{split}.json, written back -> its path."""
    path = root / "annotations" / f"instances_{split}.json"
    coco = json.loads(path.read_text())
    edit(coco)
    path.write_text(json.dumps(coco))
    return path


def first_annotation(**fields):
    """An edit that sets fields of the first annotation: in write_coco's train2017 annotation 1, a
    16 x 16 square at (4, 4) of a 64 x 48 image outlined by a polygon; in its val2017, the same."""
    return lambda coco: coco["annotations"][0].update(fields)


@pytest.mark.parametrize(
    "split, edit, needles",
    [
        ("train2017", first_annotation(bbox=["4", "4", "16", "16"]), ["annotation 1", "4 numbers"]),
        ("train2017", first_annotation(bbox=[4, 4, 16]), ["annotation 1", "4 numbers"]),
        ("val2017", first_annotation(bbox=[4, 4, -16, 16]), ["annotation 1", "negative"]),
        ("train2017", first_annotation(bbox=[50, 4, 16, 16]), ["annotation 1", "outside", "64 x 48"]),
        ("train2017", first_annotation(bbox=[4, -2, 16, 16]), ["annotation 1", "outside"]),
        ("train2017", first_annotation(segmentation=[[4, 4, 20, 4]]), ["annotation 1", "at least 3 points"]),
        ("val2017", first_annotation(segmentation=[[4, 4, 20, 4, 20, 20, 4]]), ["annotation 1", "at least 3 points"]),
        ("train2017", first_annotation(segmentation=[[4, 4, 20, 4, "20", 20]]), ["annotation 1", "at least 3 points"]),
        ("val2017", lambda coco: coco.update(annotations=[]), ["no annotations", "COCOeval"]),
        ("train2017", lambda coco: coco.update(annotations=[]), ["no annotations"]),
    ],
    ids=[
        "bbox of strings",
        "bbox of 3",
        "negative width",
        "right of the image",
        "above the image",
        "polygon of 2 points",
        "polygon of odd length",
        "polygon with a string",
        "val without annotations",
        "train without annotations",
    ],
)
def test_coco_annotations_outside_coco_s_format_are_refused_at_load(tmp_path, split, edit, needles):
    root = write_coco(tmp_path / "coco")
    path = edit_annotations(root, split, edit)
    refused(lambda: detect.CocoDetection(root, split), path, *needles)


def test_coco_boxes_may_reach_a_pixel_past_the_border_and_empty_ones_are_dropped(tmp_path):
    root = write_coco(tmp_path / "coco")
    edit_annotations(root, "train2017", first_annotation(bbox=[-0.5, 4, 65, 16]))  # 0.5 px past either side
    edit_annotations(root, "val2017", first_annotation(bbox=[4, 4, 16, 0]))  # COCO 2017 has two of height 0
    assert detect.CocoDetection(root, "train2017")[1][1]["boxes"][0].tolist() == [-0.5, 4, 64.5, 20]
    assert len(detect.CocoDetection(root, "val2017")[1][1]["boxes"]) == 1  # of 2 objects


def bad_val_box(root):
    edit_annotations(root, "val2017", first_annotation(bbox=[4, 4, 16]))


@pytest.mark.parametrize(
    "corrupt, flags, needles",
    [
        (None, ["--in-chans", 2], ["--in-chans 2", "1 (grayscale) or 3 (RGB)"]),
        (None, ["--mean", 0.5, "--std", 0], ["--std 0.0"]),
        (bad_val_box, [], ["instances_val2017.json", "annotation 1", "4 numbers"]),
    ],
)
def test_detect_stops_on_data_it_cannot_read_with_one_line_before_writing(tmp_path, corrupt, flags, needles):
    root = write_coco(tmp_path / "coco")
    if corrupt:
        corrupt(root)
    result = test_detect.run_cli(
        "train", "--data-dir", root, "--init", "scratch", *flags, "--out-dir", tmp_path / "run", *test_detect.TINY_RUN
    )
    assert one_line_error(result, *needles)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- channels and subject splits (sleep1d.py)


@pytest.mark.parametrize(
    "channels, needles",
    [
        ("", ["--channels ''", "F3-M2,F4-M1"]),
        (" , ,", ["--channels ' , ,'", "F3-M2,F4-M1"]),
        ("F3-M2,Cz", ["--channels", "['Cz']", "'O2-M1'"]),
    ],
    ids=["empty", "only commas", "a channel the data lack"],
)
def test_sleep_channels_that_name_nothing_or_what_the_data_lack_are_refused(tmp_path, channels, needles):
    result = test_sleep1d.invoke(
        "pretrain", *test_sleep1d.TINY_RUN, "--channels", channels, "--out-dir", tmp_path / "run"
    )
    assert one_line_error(result, *needles)
    assert not (tmp_path / "run").exists()


def test_sleep_edf_channels_the_files_lack_are_named_with_those_they_have(tmp_path):
    nights = [test_sleep1d.write_sleep_edf(tmp_path / "edf", night)[0] for night in ("SC4011E", "SC4021E")]
    result = test_sleep1d.invoke(
        "finetune", "--init", "scratch", "--data", "sleep-edf", "--data-dir", tmp_path / "edf", "--channels",
        "EEG Fpz-Cz,EEG Cz", "--finetune-subjects", 1, "--test-subjects", 1, "--out-dir", tmp_path / "run",
    )
    assert one_line_error(result, "['EEG Cz']", "'EEG Pz-Oz'", "--channels") and any(
        str(psg) in result.output for psg in nights
    )
    assert not (tmp_path / "run").exists()


def test_synthetic_nights_are_read_with_the_channels_asked_for():
    signal, _, _ = sleep1d.synthetic_night(0, n_epochs=2)
    picked, _, _ = sleep1d.synthetic_records(1, 2)[0].read(("C4-M1", "F3-M2"))
    assert np.array_equal(picked, signal[[3, 0]])


def test_subject_counts_that_leave_no_pretraining_subjects_say_so(tmp_path):
    result = test_sleep1d.invoke(
        "pretrain", *test_sleep1d.TINY_RUN, "--synthetic-subjects", 4, "--out-dir", tmp_path / "run"
    )
    assert one_line_error(
        result, "leaves no pretraining subjects", "--finetune-subjects", "--test-subjects", "--synthetic-subjects"
    )
    assert not (tmp_path / "run").exists()
