"""The tooling of the tuned comparison (compare.sh, issue 22): the validation split carved from the
training images (train.py --val-from-train) and compare_table.py's cells, tie rule and search table."""
import torch

import data
import train
from conftest import TINY_RUN, invoke


def flags(fake_fmnist, val_from_train, train_subset=0):
    return {"data_name": "fashion-mnist", "data_dir": fake_fmnist, "img_size": None, "in_chans": None, "mean": (), "std": (),
            "train_subset": train_subset, "val_from_train": val_from_train, "skip_bad_files": False}


def images_of(dataset):
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def test_val_from_train_holds_out_training_images_the_same_under_every_seed(fake_fmnist):
    _, train_set, val_set = train.load_sets(flags(fake_fmnist, 24), data.eval_transform, data.eval_transform, seed=0)
    assert (len(train_set), len(val_set)) == (96 - 24, 24)
    everything = images_of(data.build_dataset("fashion-mnist", fake_fmnist, "train", data.DATASETS["fashion-mnist"], None))
    test_images = images_of(data.build_dataset("fashion-mnist", fake_fmnist, "val", data.DATASETS["fashion-mnist"], None))

    def indices(dataset):  # which training images, found by content (the fake images are all distinct)
        return {next(j for j in range(len(everything)) if torch.equal(everything[j], x)) for x in images_of(dataset)}

    held_out, rest = indices(val_set), indices(train_set)
    assert not held_out & rest and len(held_out | rest) == 96
    assert not any(torch.equal(x, t) for x in images_of(val_set) for t in test_images)  # never the test images
    for seed in (1, 7):  # --seed draws the subset, never the split
        _, subset, other_val = train.load_sets(flags(fake_fmnist, 24, train_subset=40), data.eval_transform, data.eval_transform, seed)
        assert indices(other_val) == held_out
        assert len(subset) == 40 and indices(subset) <= rest
    blank = lambda info, name: torch.zeros_like  # noqa: E731  a training transform the held-out images must not get
    _, train_set, val_set = train.load_sets(flags(fake_fmnist, 24), blank, data.eval_transform)
    assert images_of(train_set).eq(0).all() and indices(val_set) == held_out


def test_val_from_train_is_recorded_and_a_resume_on_another_split_stops(fake_fmnist, tmp_path):
    common = ["pretrain", "--data-dir", fake_fmnist, *TINY_RUN, "--epochs", 1, "--out-dir", tmp_path]
    assert invoke(*common, "--val-from-train", 32).exit_code == 0
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["config"]["val_from_train"] == 32
    result = invoke(*common, "--val-from-train", 16)
    assert result.exit_code == 1 and "another model or data (val_from_train: 32 -> 16)" in result.output, result.output
    result = invoke(*common, "--val-from-train", 96)
    assert result.exit_code == 1 and "leaves none of the 96 training images" in result.output, result.output
