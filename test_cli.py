"""Bad input as a new user gives it: every case one line naming the flag or file, no traceback,
nothing already written lost. Checkpoints say what they are; exports carry their config."""

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import click
import pytest
import timm
import torch
from click.testing import CliRunner

import cli
import data
import detect
import sleep1d
import train
import weights
from conftest import (
    TINY_IMAGES, TINY_RUN, crash_after_epoch, invoke, one_line_error, photo_folder, tiny_run, write_coco,
)
from vit import VisionTransformer, vit_config

REPO = Path(__file__).parent


def test_a_corrupt_jpeg_stops_the_run_naming_it_and_can_be_skipped_and_counted(tmp_path):
    photos = photo_folder(tmp_path / "photos", 60, corrupt="img_030_bad.jpg")  # 61 files: 0 and 50 held out, 59 train
    common = ["pretrain", "--data-dir", photos, *TINY_IMAGES, "--batch-size", 59, "--epochs", 1]
    result = invoke(*common, "--out-dir", tmp_path / "stop")
    assert one_line_error(result, "img_030_bad.jpg", "--skip-bad-files")
    result = invoke(*common, "--skip-bad-files", "--out-dir", tmp_path / "skip")
    assert result.exit_code == 0, result.output
    named = [line for line in result.output.splitlines() if line.startswith("--skip-bad-files: ")]
    assert len(named) == 1 and "img_030_bad.jpg is not a readable image" in named[0], result.output
    assert named[0].endswith("skipped (1 unreadable so far)")


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--epochs", -1], "--epochs"),
        (["--epochs", 0], "--epochs"),
        (["--pairs", 0], "--pairs"),
        (["--pairs", -3], "--pairs"),
        (["--batch-size", 0], "--batch-size"),
        (["--accum", 0], "--accum"),
        (["--patch-size", 0], "--patch-size"),
        (["--num-patches", -5], "--num-patches"),
        (["--blr", 0], "--blr"),
        (["--layer-decay", 1.5], "--layer-decay"),
        (["--drop-path", 1.0], "--drop-path"),
        (["--in-chans", 0], "--in-chans"),
    ],
)
def test_out_of_range_numbers_are_refused_at_parse_time(fake_fmnist, tmp_path, args, flag):
    result = invoke("pretrain", "--data-dir", fake_fmnist, *TINY_RUN, *args, "--out-dir", tmp_path)
    assert result.exit_code == 2 and flag in result.output and "Traceback" not in result.output
    assert not (tmp_path / "log.jsonl").exists()


def test_bench_steps_zero_is_refused():
    result = invoke("bench", "--steps", 0)
    assert result.exit_code == 2 and "--steps" in result.output


def test_too_many_patches_are_refused_before_training(fake_fmnist, tmp_path):
    result = invoke("pretrain", "--data-dir", fake_fmnist, *TINY_RUN, "--num-patches", 100000, "--out-dir", tmp_path)
    assert one_line_error(result, "--num-patches 100000", "16 x the 49 grid patches")
    assert not (tmp_path / "log.jsonl").exists()


def fake_checkpoint(path, kind, patch_ndim):
    """A checkpoint of `kind` as our commands write them, with a ViT of `patch_ndim` dimensions."""
    vit = vit_config("vit_test", patch_size=4, in_chans=1, patch_ndim=patch_ndim)
    model = VisionTransformer(vit)
    torch.save(
        {
            "model": {f"encoder.{k}": v for k, v in model.state_dict().items()},
            "config": {"kind": kind, "model": {"vit": asdict(vit)}},
        },
        path,
    )
    return path


def test_sleep_finetune_refuses_an_image_checkpoint_naming_both_kinds(tmp_path):
    ckpt = fake_checkpoint(tmp_path / "image.pt", "part", 2)
    result = CliRunner().invoke(
        sleep1d.main,
        [
            "finetune",
            "--init",
            str(ckpt),
            "--synthetic-subjects",
            6,
            "--finetune-subjects",
            2,
            "--test-subjects",
            2,
            "--out-dir",
            str(tmp_path / "ft"),
        ],
    )
    assert one_line_error(result, "image.pt", "PART 2D pretraining checkpoint", "PART 1D pretraining checkpoint")


def test_detect_refuses_a_sleep_checkpoint_naming_both_kinds(tmp_path):
    ckpt = fake_checkpoint(tmp_path / "sleep.pt", "part1d", 1)
    coco = write_coco(tmp_path / "coco")
    result = CliRunner().invoke(detect.main, ["eval", "--init", str(ckpt), "--data-dir", str(coco)])
    assert one_line_error(result, "sleep.pt", "PART 1D pretraining checkpoint", "PART 2D pretraining checkpoint")


def test_detect_names_an_unknown_command_instead_of_training():
    result = CliRunner().invoke(detect.main, ["evl", "--ckpt", "x.pt"])
    assert result.exit_code == 2 and "No such command 'evl'" in result.output


def test_export_of_a_non_default_preset_carries_its_config_into_finetune_and_timm(fake_fmnist, tmp_path):
    assert (
        invoke("pretrain", "--data-dir", fake_fmnist, *TINY_RUN, "--epochs", 1, "--out-dir", tmp_path / "pre").exit_code
        == 0
    )
    out = tmp_path / "new" / "folder"  # does not exist yet
    result = invoke("export", "--ckpt", tmp_path / "pre" / "checkpoint.pt", "--out-dir", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "encoder.json",
        "encoder.pt",
        "model.safetensors",
    ]  # no .tmp left
    config = json.loads((out / "encoder.json").read_text())
    assert (
        config["kind"] == "encoder" and config["model"]["vit"]["embed_dim"] == 32
    )  # vit_test, not the default vit_mini
    result = invoke(
        "finetune", "--data-dir", fake_fmnist, "--init", out / "encoder.pt", "--epochs", 1, "--batch-size", 32,
        "--out-dir", tmp_path / "ft",
    )
    assert result.exit_code == 0, result.output
    vit = config["model"]["vit"]  # timm from the exported config alone
    (H, W), state = config["model"]["img_size"], torch.load(out / "encoder.pt", weights_only=True)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=(H, W), patch_size=vit["patch_size"], in_chans=vit["in_chans"], embed_dim=vit["embed_dim"],
        depth=vit["depth"], num_heads=vit["num_heads"], mlp_ratio=vit["mlp_ratio"], num_classes=0, class_token=False,
        pos_embed="none", global_pool="avg", fc_norm=False,
    )
    model.load_state_dict(state)  # strict


def test_an_export_killed_mid_write_leaves_the_old_export_whole_and_a_foreign_folder_is_refused(
    fake_fmnist, tmp_path, monkeypatch
):
    invoke("pretrain", "--data-dir", fake_fmnist, *TINY_RUN, "--epochs", 1, "--out-dir", tmp_path / "pre")
    ckpt, out = tmp_path / "pre" / "checkpoint.pt", tmp_path / "export"
    assert invoke("export", "--ckpt", ckpt, "--out-dir", out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def killed(*args):
        raise KeyboardInterrupt  # as a kill between the encoder's files and timm's

    monkeypatch.setattr(weights, "write_timm_export", killed)
    assert invoke("export", "--ckpt", ckpt, "--out-dir", out).exit_code != 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.undo()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    result = invoke("export", "--ckpt", ckpt, "--out-dir", tmp_path / "mine")
    assert one_line_error(result, "holds more than an export") and os.listdir(tmp_path / "mine") == ["notes.txt"]


def test_export_refuses_a_detector_and_writes_nothing(tmp_path):
    ckpt = fake_checkpoint(tmp_path / "det.pt", "detect", 2)
    result = invoke("export", "--ckpt", ckpt, "--out-dir", tmp_path / "out")
    assert one_line_error(result, "det.pt", "a detector") and not (tmp_path / "out").exists()


def test_coco_with_an_unknown_category_is_refused_at_load_naming_the_file(tmp_path):
    root = write_coco(tmp_path / "coco")
    path = root / "annotations" / "instances_train2017.json"
    coco = json.loads(path.read_text())
    coco["annotations"][0]["category_id"] = 99
    path.write_text(json.dumps(coco))
    result = CliRunner().invoke(
        detect.main,
        [
            "--data-dir",
            str(root),
            "--init",
            "scratch",
            "--preset",
            "vit_test",
            "--img-size",
            64,
            "--out-dir",
            str(tmp_path / "out"),
        ],
    )
    assert one_line_error(result, "instances_train2017.json", "category_id 99")


@pytest.mark.parametrize("chans", [2, 4])
def test_folders_of_2_or_4_channels_train_with_their_own_statistics(tmp_path, chans):
    photos = photo_folder(tmp_path / "photos", 12)
    stats = [a for c in range(chans) for a in ("--mean", 0.5, "--std", 0.25)]
    result = invoke(
        "pretrain", "--data-dir", photos, *TINY_IMAGES, "--in-chans", chans, *stats, "--batch-size", 4, "--epochs", 1,
        "--out-dir", tmp_path / "run",
    )
    assert result.exit_code == 0, result.output
    model = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["config"]["model"]
    assert model["vit"]["in_chans"] == chans and tuple(model["mean"]) == (0.5,) * chans
    result = invoke(
        "pretrain", "--data-dir", photos, *TINY_IMAGES, "--in-chans", chans, "--mean", 0.5, "--std", 0.25, "--out-dir",
        tmp_path / "bad",
    )
    assert one_line_error(result, "--mean", f"one value per input channel, {chans}")
    result = invoke("pretrain", "--data-dir", photos, *TINY_IMAGES, "--in-chans", 5, "--out-dir", tmp_path / "five")
    assert one_line_error(result, "--in-chans 5")


def test_in_chans_that_the_data_do_not_have_is_refused(fake_fmnist, tmp_path):
    result = invoke("pretrain", "--data-dir", fake_fmnist, *TINY_RUN, "--in-chans", 3, "--out-dir", tmp_path)
    assert one_line_error(result, "--in-chans 3", "fashion-mnist images have 1 channel")


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--batch-size", 16, "another recipe (batch_size: 32 -> 16, effective_batch: 32 -> 16)"),
        ("--blr", 1e-2, "another recipe (blr: 0.0015 -> 0.01)"),
        ("--train-subset", 64, "another model or data (train_subset: 0 -> 64)"),
    ],
)
def test_resume_refuses_a_changed_recipe_unless_asked(fake_fmnist, tmp_path, flag, value, message):
    common = ["pretrain", "--data-dir", fake_fmnist, *TINY_RUN, "--out-dir", tmp_path]
    assert invoke(*common, "--epochs", 1).exit_code == 0
    before = (tmp_path / "log.jsonl").read_text()
    assert one_line_error(invoke(*common, "--epochs", 2, flag, value), str(tmp_path / "checkpoint.pt"), message)
    assert (tmp_path / "log.jsonl").read_text() == before and torch.load(tmp_path / "checkpoint.pt", weights_only=True)[
        "epoch"
    ] == 1
    if flag != "--train-subset":  # a recipe change may be forced; other data may not
        assert invoke(*common, "--epochs", 2, flag, value, "--resume-changed").exit_code == 0


def test_xavier_init_reaches_the_model_of_pretrain_and_of_a_scratch_finetuning(fake_fmnist, tmp_path):
    common = ["--data-dir", fake_fmnist, "--preset", "vit_test", "--batch-size", 32, "--epochs", 1, "--xavier-init"]
    assert invoke("pretrain", *common, "--pairs", 16, "--out-dir", tmp_path / "pre").exit_code == 0
    assert invoke("finetune", "--init", "scratch", *common, "--out-dir", tmp_path / "ft").exit_code == 0
    for run in ("pre", "ft"):
        vit = torch.load(tmp_path / run / "checkpoint.pt", weights_only=True)["config"]["model"]["vit"]
        assert vit["xavier_init"] is True, run


def test_resume_after_a_crash_logs_each_step_once_and_a_finished_run_says_so(fake_fmnist, tmp_path, monkeypatch):
    common = ["pretrain", "--data-dir", fake_fmnist, *TINY_RUN, "--epochs", 2, "--out-dir", tmp_path]
    crash_after_epoch(monkeypatch, 1)
    assert invoke(*common).exit_code != 0  # dies after logging epoch 2's steps, before its checkpoint
    monkeypatch.undo()
    assert invoke(*common).exit_code == 0
    steps = [json.loads(line)["step"] for line in open(tmp_path / "log.jsonl") if "img_per_s" in line]
    assert steps == sorted(set(steps)) and len(steps) == 2 * 3  # 96 images / 32: 3 steps per epoch, each logged once
    result = invoke(*common)
    assert result.exit_code == 0 and "finished run of 2 epochs" in result.output
    assert len([line for line in open(tmp_path / "log.jsonl")]) == 2 * 3 + 2


def test_progress_counts_epochs_from_one(fake_fmnist, tmp_path):
    assert invoke("pretrain", "--data-dir", fake_fmnist, *TINY_RUN, "--epochs", 1, "--out-dir", tmp_path).exit_code == 0
    rows = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert {r["epoch"] for r in rows} == {1}


def test_every_flag_of_every_command_has_help():
    for main in (train.main, sleep1d.main, detect.main):
        for name, command in main.commands.items():
            assert [p.name for p in command.params if isinstance(p, click.Option) and not p.help] == [], name


def test_comma_lists_parse_once_and_a_bad_one_is_named(fake_fmnist, tmp_path):
    result = invoke("pretrain", "--data-dir", fake_fmnist, *TINY_RUN, "--lr-drops", "1,x", "--out-dir", tmp_path)
    assert result.exit_code == 2 and "--lr-drops" in result.output and "'1,x'" in result.output, result.output
    assert not (tmp_path / "checkpoint.pt").exists()
    result = invoke(
        "pretrain", "--data-dir", fake_fmnist, *TINY_RUN, "--epochs", 2, "--lr-drops", "1", "--out-dir", tmp_path
    )
    assert result.exit_code == 0, result.output
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["config"]["recipe"]["lr_drops"] == (1.0,)


@pytest.mark.parametrize(
    "method, flag, value, takers",
    [
        ("part", "--mask-ratio", 0.5, "mae, droppos"),
        ("mae", "--pairs", 64, "part"),
        ("droppos", "--sampler", "grid", "part"),
    ],
)
def test_a_flag_the_method_does_not_take_is_named_with_the_methods_that_do(
    fake_fmnist, tmp_path, method, flag, value, takers
):
    result = invoke(
        "pretrain", "--method", method, flag, value, "--data-dir", fake_fmnist, *tiny_run(method), "--out-dir",
        tmp_path / "run",
    )
    assert one_line_error(result, f"{flag} is not a flag of --method {method}: it is for {takers}"), result.output
    assert not (tmp_path / "run").exists()


def test_float_flags_refuse_nan_and_infinity(fake_fmnist, tmp_path):
    for flag, value in (("--blr", "nan"), ("--weight-decay", "inf"), ("--drop-path", "nan"), ("--mask-ratio", "nan")):
        result = invoke("pretrain", flag, value, "--data-dir", fake_fmnist, *TINY_RUN, "--out-dir", tmp_path)
        assert result.exit_code == 2 and f"'{flag}': {value} is not a finite number" in result.output, result.output


def test_a_seed_beyond_what_numpy_and_torch_take_is_refused_when_parsed(fake_fmnist, tmp_path):
    for seed in (2**32, -1):
        result = invoke("pretrain", "--seed", seed, "--data-dir", fake_fmnist, *TINY_RUN, "--out-dir", tmp_path / "run")
        assert result.exit_code == 2 and "'--seed'" in result.output and "0<=x<=4294967295" in result.output
        assert "Traceback" not in result.output and not (tmp_path / "run").exists()


def test_a_file_error_is_one_line_naming_the_file_and_a_bug_says_it_is_one(fake_fmnist, tmp_path, monkeypatch):
    def unreadable(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "secret.idx"))

    monkeypatch.setattr(data, "read_idx", unreadable)
    result = invoke("pretrain", "--data-dir", fake_fmnist, *TINY_RUN, "--out-dir", tmp_path / "run")
    assert one_line_error(result, "secret.idx: Permission denied"), result.output
    monkeypatch.setattr(data, "read_idx", lambda *a: {}["no such key"])  # a bug: a KeyError deep inside
    result = invoke("pretrain", "--data-dir", fake_fmnist, *TINY_RUN, "--out-dir", tmp_path / "run")
    assert (
        result.exit_code == 1 and "Traceback" in result.output and "is a bug in PART" in result.output.splitlines()[-1]
    )


@pytest.mark.slow
def test_a_foreign_timm_state_dict_is_read_at_its_own_size_by_finetune_and_detect(fake_fmnist, tmp_path):
    theirs = timm.models.VisionTransformer(
        img_size=28, patch_size=4, in_chans=1, embed_dim=48, depth=2, num_heads=3, num_classes=7
    )
    ckpt = tmp_path / "timm.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in theirs.state_dict().items()}}, ckpt)
    result = invoke(
        "finetune", "--init", ckpt, "--data-dir", fake_fmnist, "--batch-size", 32, "--epochs", 1, "--out-dir",
        tmp_path / "ft",
    )
    assert result.exit_code == 0, result.output
    ours = torch.load(tmp_path / "ft" / "checkpoint.pt", weights_only=True)["config"]["model"]["vit"]
    assert (ours["embed_dim"], ours["depth"], ours["num_heads"], ours["patch_size"]) == (
        48, 2, 1, 4,
    )  # heads: 48 / 64 -> 1
    result = invoke(
        "finetune", "--init", ckpt, "--preset", "vit_mini", "--data-dir", fake_fmnist, "--out-dir", tmp_path / "ft2"
    )
    assert one_line_error(result, "its ViT has embed_dim 48, depth 2"), result.output  # the file's own shapes
    coco = write_coco(tmp_path / "coco")
    result = CliRunner().invoke(detect.main, ["eval", "--init", str(ckpt), "--data-dir", str(coco), "--img-size", 64])
    assert result.exit_code == 0 and "AP" in result.output, result.output


def test_help_lists_flags_in_sections():
    text = invoke("pretrain", "--help").output
    heads = [line for line in text.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert heads == ["Data:", "Model:", "Method:", "Recipe:", "Options:"], heads
    recipe = text[text.index("Recipe:") : text.index("Options:")]
    assert "--blr" in recipe and "--mask-ratio" not in recipe and "--mask-ratio" in text[text.index("Method:") :]


def test_knn_under_torchrun_runs_on_rank_0_alone(fake_fmnist, tmp_path, monkeypatch):
    assert (
        invoke("pretrain", "--data-dir", fake_fmnist, *TINY_RUN, "--epochs", 1, "--out-dir", tmp_path / "pre").exit_code
        == 0
    )
    ckpt = tmp_path / "pre" / "checkpoint.pt"
    monkeypatch.setenv("RANK", "1")
    result = invoke("knn", "--ckpt", ckpt, "--data-dir", fake_fmnist)
    assert result.exit_code == 0 and result.output == "", result.output
    monkeypatch.setenv("RANK", "0")
    result = invoke("knn", "--ckpt", ckpt, "--data-dir", fake_fmnist)
    assert result.exit_code == 0 and result.output.count("kNN top-1") == 1, result.output


def test_runs_end_on_the_metric_they_are_judged_by_and_where_the_checkpoint_is(fake_fmnist, tmp_path):
    result = invoke("pretrain", "--data-dir", fake_fmnist, *TINY_RUN, "--epochs", 1, "--out-dir", tmp_path / "pre")
    last = result.output.strip().splitlines()[-1]
    assert (
        result.exit_code == 0 and "x the zero predictor's" in last and str(tmp_path / "pre" / "checkpoint.pt") in last
    ), last
    result = invoke(
        "finetune", "--init", tmp_path / "pre" / "checkpoint.pt", "--data-dir", fake_fmnist, "--batch-size", 32,
        "--epochs", 1, "--out-dir", tmp_path / "ft",
    )
    last = result.output.strip().splitlines()[-1]
    assert result.exit_code == 0 and last.startswith("finetune: held-out top-1 ") and "checkpoint_best.pt" in last, last


def test_a_1d_pretext_stuck_at_the_zero_predictor_says_so():
    stuck = {"euclid": 3.0, "euclid_zero": 3.0, "loss": 9.0}
    assert "try --pos-mask 0.2" in cli.pretrain_summary("part (1D)", stuck, "out", signals=True)
    assert "--pos-mask" not in cli.pretrain_summary(
        "part", stuck, "out"
    ) and "1.000 x the zero" in cli.pretrain_summary("part", stuck, "out")
    assert "position accuracy 0.500" in cli.pretrain_summary("mp3", {"pos_acc": 0.5, "loss": 1.0}, "out")


def test_knn_reads_a_foreign_timm_state_dict_on_the_dataset_named(fake_fmnist, tmp_path):
    theirs = timm.models.VisionTransformer(img_size=28, patch_size=4, in_chans=1, embed_dim=48, depth=2, num_heads=3, num_classes=7)
    ckpt = tmp_path / "timm.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in theirs.state_dict().items()}}, ckpt)
    assert one_line_error(invoke("knn", "--ckpt", ckpt, "--data-dir", fake_fmnist), "pass --data")
    result = invoke("knn", "--ckpt", ckpt, "--data", "fashion-mnist", "--data-dir", fake_fmnist, "--pool", "cls")
    assert result.exit_code == 0 and "kNN top-1" in result.output, result.output
    encoder, _, _ = weights.frozen_encoder(str(ckpt), False, "fashion-mnist")
    torch.testing.assert_close(encoder.pos_embed, theirs.pos_embed)  # its own 7 x 7 grid and class slot, kept


@pytest.mark.slow
def test_rerun_repeats_a_finished_run_s_command_to_the_same_weights(fake_fmnist, tmp_path):
    command = ["train.py", "pretrain", "--data-dir", str(fake_fmnist), *map(str, TINY_RUN), "--epochs", "1"]
    subprocess.run([sys.executable, *command, "--out-dir", str(tmp_path / "run")], cwd=REPO, check=True)
    result = invoke("rerun", tmp_path / "run", "--out-dir", tmp_path / "again")
    assert result.exit_code == 0 and "repeating train.py pretrain --data-dir" in result.output, result.output
    first, again = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True)["model"] for d in ("run", "again"))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "run.json").write_text("[]")
    assert one_line_error(invoke("rerun", tmp_path / "bad", "--out-dir", tmp_path / "x"), "not a run.json of ours")
