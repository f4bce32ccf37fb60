"""Bad input to the data layer (issue #20), as a new user gives it: each case stops with one line naming
the file or flag, before anything is written, or is read in full. `python3 -m pytest -q test_faults.py`"""

import pytest
from PIL import Image

import data
from conftest import invoke
from test_cli import one_line_error, photo_folder


def refused(call, *needles):
    """call() raises data.DataError with a one-line message holding every needle."""
    with pytest.raises(data.DataError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message and all(str(n) in message for n in needles), message


# ---------------------------------------------------------------- image folders


def class_folders(root, splits):
    """An ImageNet-style tree: {split: class names} -> two small JPEGs per class folder."""
    for split, classes in splits.items():
        for name in classes:
            photo_folder(root / split / name, 2)
    return root


def test_val_classes_must_be_the_class_folders_of_train(tmp_path):
    root = class_folders(tmp_path / "tree", {"train": "abc", "val": "ax"})
    result = invoke("pretrain", "--data", "imagefolder", "--data-dir", root, "--img-size", 32, "--patch-size", 8, "--preset", "vit_test",
                    "--pairs", 16, "--batch-size", 2, "--epochs", 1, "--out-dir", tmp_path / "run")
    assert one_line_error(result, str(root / "val"), "extra ['x']", "missing ['b', 'c']")
    assert not (tmp_path / "run").exists()
    root = class_folders(tmp_path / "short", {"train": "abc", "val": "ac"})
    info = data.data_info("imagefolder")
    refused(lambda: data.build_dataset("imagefolder", str(root), "val", info, None), "missing ['b']")
    (root / "val" / "b").mkdir()
    Image.new("RGB", (8, 8)).save(root / "val" / "b" / "0.png")
    val_set = data.build_dataset("imagefolder", str(root), "val", info, None)
    assert val_set.class_to_idx == {"a": 0, "b": 1, "c": 2} and val_set[-1][1] == 2
