"""The engine's faults: what a run survives and how it stops (issues #20 and #24). Each fault ends in the
right result or one line naming the file or flag, and leaves what was written before as it was (checksums)."""

import errno
import hashlib
import importlib.metadata
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

import data
import engine
from conftest import (
    CEILING_S, LAUNCH_VARS, TINY_IMAGES, TINY_RUN, crash_after_epoch, free_port, global_state, invoke, one_line_error,
    photo_folder, write_idx,
)

REPO = Path(__file__).parent


def checksums(folder, pattern="*.pt"):
    """{file name: sha256} of the files in folder that match pattern."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).glob(pattern))}


def log_rows(out_dir):
    return [json.loads(line) for line in open(Path(out_dir) / "log.jsonl")]


# ---------------------------------------------------------------- #20: one run per out-dir, nothing lost


def test_an_out_dir_holds_one_run_and_a_killed_holder_leaves_no_lock(fake_fmnist, tmp_path):
    out = tmp_path / "run"
    common = ["pretrain", "--data-dir", fake_fmnist, *TINY_RUN, "--out-dir", out]
    assert invoke(*common, "--epochs", 1).exit_code == 0
    before = checksums(out, "*[tl]")  # checkpoint.pt, log.jsonl
    holder = subprocess.Popen(  # another run's lock, taken as fit takes it
        [
            sys.executable,
            "-c",
            "import sys, pathlib, engine; lock = engine.take_lock(pathlib.Path(sys.argv[1])); "
            "print('locked', flush=True); sys.stdin.read()",
            str(out),
        ],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = invoke(*common, "--epochs", 2)
        assert one_line_error(result, out, "in use by another run", f"pid {holder.pid}")
        assert checksums(out, "*[tl]") == before
    finally:
        holder.kill()  # SIGKILL: the lock goes with the process
        holder.wait()
    assert invoke(*common, "--epochs", 2).exit_code == 0


def test_a_crash_between_the_best_and_the_last_checkpoint_keeps_the_best(fake_fmnist, tmp_path, monkeypatch):
    common = [
        "finetune",
        "--data-dir",
        fake_fmnist,
        "--init",
        "scratch",
        "--preset",
        "vit_test",
        "--batch-size",
        32,
        "--epochs",
        1,
        "--out-dir",
        tmp_path,
    ]
    save, written = engine.save_checkpoint, []

    def second_write_dies(path, state):
        if written:
            raise KeyboardInterrupt
        written.append(Path(path).name)
        save(path, state)

    monkeypatch.setattr(engine, "save_checkpoint", second_write_dies)
    assert invoke(*common).exit_code != 0
    monkeypatch.undo()
    assert written == ["checkpoint_best.pt"] and not (tmp_path / "checkpoint.pt").exists()
    best = torch.load(tmp_path / "checkpoint_best.pt", weights_only=True)
    assert best["epoch"] == 1 and best["best"] == best["metrics"]["acc"]
    assert best["config"]["data_dir"] == str(fake_fmnist.resolve())
    before = checksums(tmp_path)
    assert invoke(*common).exit_code == 0  # redoes epoch 1, to the same weights: the best is kept, not rewritten
    assert checksums(tmp_path)["checkpoint_best.pt"] == before["checkpoint_best.pt"]
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["best"] == best["best"]


# ---------------------------------------------------------------- #20: tracebacks that are one line now


def test_a_zero_byte_checkpoint_is_named_in_one_line_in_the_out_dir_and_as_init(fake_fmnist, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"")  # the file a full disk leaves
    result = invoke("pretrain", "--data-dir", fake_fmnist, *TINY_RUN, "--out-dir", tmp_path / "run")
    assert one_line_error(result, tmp_path / "run" / "checkpoint.pt", "is empty (0 bytes)")
    assert (tmp_path / "run" / "checkpoint.pt").stat().st_size == 0
    (tmp_path / "empty.pt").write_bytes(b"")
    result = invoke("finetune", "--data-dir", fake_fmnist, "--init", tmp_path / "empty.pt", "--out-dir", tmp_path)
    assert one_line_error(result, tmp_path / "empty.pt", "is empty (0 bytes)")


@pytest.mark.parametrize("where, message", [("file", "is a file, not a folder"), ("file/run", "cannot be created")])
def test_an_out_dir_that_is_a_file_or_cannot_be_made_is_named(fake_fmnist, tmp_path, where, message):
    (tmp_path / "file").write_text("not a folder")
    result = invoke("pretrain", "--data-dir", fake_fmnist, *TINY_RUN, "--out-dir", tmp_path / where)
    assert one_line_error(result, f"--out-dir {tmp_path / where}", message)
    assert (tmp_path / "file").read_text() == "not a folder"


def test_a_full_disk_during_a_save_keeps_the_last_checkpoint_and_names_it(fake_fmnist, tmp_path, monkeypatch):
    common = ["pretrain", "--data-dir", fake_fmnist, *TINY_RUN, "--out-dir", tmp_path]
    assert invoke(*common, "--epochs", 1).exit_code == 0
    before = checksums(tmp_path)

    def disk_full(state, path):
        Path(path).write_bytes(b"the first bytes")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    result = invoke(*common, "--epochs", 2)
    assert one_line_error(result, tmp_path / "checkpoint.pt", "No space left on device", "checkpoint.pt is unchanged")
    assert checksums(tmp_path) == before and not list(tmp_path.glob("*.tmp"))
    monkeypatch.undo()
    assert invoke(*common, "--epochs", 2).exit_code == 0


def test_a_log_line_that_is_not_json_is_named_and_a_torn_last_line_is_dropped(fake_fmnist, tmp_path):
    common = ["pretrain", "--data-dir", fake_fmnist, *TINY_RUN, "--out-dir", tmp_path]
    assert invoke(*common, "--epochs", 1).exit_code == 0
    log, before = tmp_path / "log.jsonl", checksums(tmp_path)
    good = log.read_text()
    log.write_text("an editor's note\n" + good)
    result = invoke(*common, "--epochs", 2)
    assert one_line_error(result, log, "line 1 is not a row of ours")
    assert checksums(tmp_path) == before and log.read_text() == "an editor's note\n" + good
    log.write_text(good + '{"epoch": 2, "st')  # a kill in the middle of a write
    assert invoke(*common, "--epochs", 2).exit_code == 0
    steps = [r["step"] for r in log_rows(tmp_path) if "img_per_s" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_checkpoint_without_step_is_named(fake_fmnist, tmp_path):
    common = ["pretrain", "--data-dir", fake_fmnist, *TINY_RUN, "--out-dir", tmp_path]
    assert invoke(*common, "--epochs", 1).exit_code == 0
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    del ckpt["step"]
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    before = checksums(tmp_path)
    assert one_line_error(invoke(*common, "--epochs", 2), tmp_path / "checkpoint.pt", "has no step")
    assert checksums(tmp_path) == before


def unreadable_images(folder, n):
    """n files named .jpg that hold the first third of a JPEG."""
    folder.mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(folder / "whole.jpg")
    cut = (folder / "whole.jpg").read_bytes()[:200]
    (folder / "whole.jpg").unlink()
    for i in range(n):
        (folder / f"bad_{i:02d}.jpg").write_bytes(cut)
    return folder


def test_a_training_set_whose_every_file_is_unreadable_stops_in_one_line(tmp_path):
    photos = unreadable_images(tmp_path / "photos", 13)  # 12 to train on, 1 held out
    result = invoke(
        "pretrain", "--data-dir", photos, *TINY_IMAGES, "--batch-size", 4, "--skip-bad-files", "--out-dir",
        tmp_path / "run",
    )
    assert one_line_error(result, "all 12 image files are unreadable", "--skip-bad-files")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_finetune_whose_every_held_out_file_is_unreadable_stops_in_one_line(tmp_path):
    root = tmp_path / "folder"
    for c in ("a", "b"):
        photo_folder(root / "train" / c, 8)
        unreadable_images(root / "val" / c, 2)
    result = invoke(
        "finetune", "--data", "imagefolder", "--data-dir", root, "--init", "scratch", "--img-size", 32, "--patch-size",
        8, "--preset", "vit_test", "--batch-size", 8, "--epochs", 1, "--skip-bad-files", "--out-dir", tmp_path / "run",
    )
    assert one_line_error(result, "all 4 image files are unreadable", "--skip-bad-files")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


# ---------------------------------------------------------------- #20: the log and the data a run resumes with


def test_a_resume_with_fewer_steps_per_epoch_keeps_the_earlier_epochs_log(fake_fmnist, tmp_path):
    common = ["pretrain", "--data-dir", fake_fmnist, *TINY_RUN, "--out-dir", tmp_path]
    assert invoke(*common, "--epochs", 2).exit_code == 0  # batch 32: 3 steps an epoch
    assert invoke(*common, "--epochs", 3, "--batch-size", 96, "--resume-changed").exit_code == 0  # 1 step an epoch
    assert invoke(*common, "--epochs", 4, "--batch-size", 96).exit_code == 0
    assert [(r["epoch"], r["step"]) for r in log_rows(tmp_path)] == [
        (1, 1),
        (1, 2),
        (1, 3),
        (1, 3),
        (2, 4),
        (2, 5),
        (2, 6),
        (2, 6),
        (3, 3),
        (3, 3),
        (4, 4),
        (4, 4),
    ]


def test_the_config_records_the_data_location_and_resume_refuses_other_data(fake_fmnist, tmp_path, monkeypatch):
    other = tmp_path / "moved"
    other.mkdir()
    for p in fake_fmnist.glob("*.gz"):
        (other / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "run"
    common = ["pretrain", *TINY_RUN, "--out-dir", out]
    assert invoke(*common, "--data-dir", fake_fmnist, "--epochs", 1).exit_code == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["config"]["data_dir"] == str(fake_fmnist.resolve())
    before = checksums(out, "*[tl]")
    result = invoke(*common, "--data-dir", other, "--epochs", 2)
    assert one_line_error(result, out / "checkpoint.pt", "another data location", f"data_dir: {fake_fmnist} -> {other}")
    assert checksums(out, "*[tl]") == before
    assert invoke(*common, "--data-dir", other, "--epochs", 2, "--resume-changed").exit_code == 0  # the data moved
    monkeypatch.setattr(data, "FASHION_MNIST_DEBIAN", str(other))  # no --data-dir: the fallback folder is recorded
    assert invoke(*common[:-1], tmp_path / "fallback", "--epochs", 1).exit_code == 0
    config = torch.load(tmp_path / "fallback" / "checkpoint.pt", weights_only=True)["config"]
    assert config["data_dir"] == str(other.resolve())


# ---------------------------------------------------------------- #24: stops, resumed mid-epoch to the same weights


@pytest.fixture(scope="module")
def long_epochs(tmp_path_factory):
    """A Fashion-MNIST folder of 320 training images (40 steps of 8 an epoch, time to stop a run in one), and an
    uninterrupted 2-epoch run on it."""
    root = tmp_path_factory.mktemp("long")
    g = torch.Generator().manual_seed(0)
    for prefix, n in (("train", 320), ("t10k", 32)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", (torch.rand(n, 28, 28, generator=g) * 255).numpy())
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", torch.randint(0, 10, (n,), generator=g).numpy())
    common = ["pretrain", "--data-dir", root, *TINY_RUN, "--batch-size", 8, "--epochs", 2]
    assert invoke(*common, "--out-dir", root / "whole").exit_code == 0
    return common, torch.load(root / "whole" / "checkpoint.pt", weights_only=True)["model"]


def wait_for_step(out_dir, step, proc, timeout=CEILING_S):
    """Until out_dir/log.jsonl holds a row of `step` (the run is mid-epoch 1)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        log = out_dir / "log.jsonl"
        if log.exists() and any(f'"step": {step},' in line for line in log.read_text().splitlines()):
            return
        time.sleep(0.02)
    state = "ended" if proc.poll() is not None else "hangs"
    pytest.fail(f"no step {step} in {out_dir / 'log.jsonl'} (the run {state})")


@pytest.mark.parametrize(
    "sig, flags",
    [
        (signal.SIGTERM, ["--workers", 2]), (signal.SIGINT, []), (signal.SIGUSR1, []),
        (signal.SIGKILL, ["--save-every-min", 0.0002]),
    ],
)
@pytest.mark.slow
def test_a_stop_mid_epoch_checkpoints_that_step_and_a_rerun_ends_as_an_uninterrupted_run(
    long_epochs, tmp_path, sig, flags
):
    common, whole = long_epochs
    proc = subprocess.Popen(
        [sys.executable, "train.py", *map(str, common + flags), "--out-dir", str(tmp_path)], cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    wait_for_step(tmp_path, 5, proc)
    proc.send_signal(sig)
    output = proc.communicate(timeout=CEILING_S)[0]
    stopped = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert stopped["epoch"] == 0 and 0 < stopped["epoch_step"] < 40  # part-way into epoch 1
    if sig != signal.SIGKILL:
        errors = [line for line in output.splitlines() if line.startswith("Error")]
        assert proc.returncode == 1 and len(errors) == 1 and "Traceback" not in output
        assert f"stopped by {sig.name} at step {stopped['step']}" in errors[0]
        assert f"{tmp_path / 'checkpoint.pt'} holds the run: rerun the same command to resume" in errors[0]
    result = invoke(*common, *flags, "--out-dir", tmp_path)
    assert result.exit_code == 0 and f"and {stopped['epoch_step']} steps of epoch 1" in result.output
    model = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(model[k], whole[k]) for k in whole)
    assert [r["step"] for r in log_rows(tmp_path) if "img_per_s" in r] == list(range(1, 81))


@pytest.mark.slow
def test_a_crash_and_rerun_with_two_workers_ends_as_an_uninterrupted_run(fake_fmnist, tmp_path, monkeypatch):
    common = ["pretrain", "--data-dir", fake_fmnist, *TINY_RUN, "--epochs", 2]
    assert invoke(*common, "--workers", 2, "--out-dir", tmp_path / "whole").exit_code == 0
    crash_after_epoch(monkeypatch, 1)
    assert invoke(*common, "--workers", 2, "--out-dir", tmp_path / "rerun").exit_code != 0
    monkeypatch.undo()
    assert invoke(*common, "--workers", 2, "--out-dir", tmp_path / "rerun").exit_code == 0
    assert invoke(*common, "--workers", 0, "--out-dir", tmp_path / "no_workers").exit_code == 0
    whole, rerun, no_workers = (
        torch.load(tmp_path / d / "checkpoint.pt", weights_only=True)["model"] for d in ("whole", "rerun", "no_workers")
    )
    assert all(torch.equal(whole[k], rerun[k]) and torch.equal(whole[k], no_workers[k]) for k in whole)


def test_tensorboard_events_hold_the_logs_numbers_and_are_cut_back_with_it_on_resume(fake_fmnist, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    common = ["pretrain", "--data-dir", fake_fmnist, *TINY_RUN, "--epochs", 2, "--tensorboard", "--out-dir", tmp_path]
    crash_after_epoch(monkeypatch, 1)  # epoch 2's rows are written, its checkpoint is not: the rerun redoes them
    assert invoke(*common).exit_code != 0
    monkeypatch.undo()
    assert invoke(*common).exit_code == 0
    rows = log_rows(tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    tags = {k for r in rows for k, v in r.items() if k not in ("epoch", "step") and isinstance(v, (int, float))}
    assert {"loss", "lr", "val_euclid"} <= tags and set(events.Tags()["scalars"]) == tags
    for tag in tags:  # each logged number once, at its step: none of the first attempt's epoch 2
        logged = [(r["step"], pytest.approx(r[tag], rel=1e-6)) for r in rows if tag in r]
        assert [(e.step, e.value) for e in events.Scalars(tag)] == logged, tag


def test_tensorboard_without_its_package_stops_with_one_line_before_training(fake_fmnist, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # an import of it fails, as if not installed
    result = invoke("pretrain", "--data-dir", fake_fmnist, *TINY_RUN, "--epochs", 1, "--tensorboard", "--out-dir", tmp_path)
    assert one_line_error(result, "--tensorboard needs the tensorboard package: pip install tensorboard"), result.output
    assert not (tmp_path / "checkpoint.pt").exists()


# ---------------------------------------------------------------- #24: two processes (gloo) that agree


class Tiny(nn.Module):
    """The smallest model fit trains: a linear classifier of 4 x 4 inputs, the same weights in every process."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(16, 4)

    def forward(self, x, y):
        logits = self.fc(x.flatten(1))
        loss = F.cross_entropy(logits, y)
        return loss, {"loss": loss.detach(), "acc": (logits.argmax(-1) == y).float().mean()}


def tiny_set(n, seed, nan=False):
    """n random 4 x 4 inputs with labels; all NaN with nan."""
    g = torch.Generator().manual_seed(seed)
    x = torch.full((n, 4, 4), math.nan) if nan else torch.randn(n, 4, 4, generator=g)
    return TensorDataset(x, torch.randint(0, 4, (n,), generator=g))


def tiny_fit(dd, out_dir, train_set, **recipe):
    """fit of Tiny, 8 a batch, a log row every step; -> its weights, or the line of the engine.UserError it stopped with."""
    model = Tiny()
    recipe = engine.Recipe(
        **{"epochs": 1, "batch_size": 8, "blr": 1e-2, "warmup_epochs": 0, "workers": 0, "log_every": 1, **recipe}
    )
    try:
        engine.fit(model, train_set, tiny_set(16, 99), recipe, out_dir, {"kind": "test"}, dd)
    except engine.UserError as e:
        return str(e)
    return model.state_dict()


def _ranked(rank, world, port, results, fn, args):
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)  # two processes on a CPU runner
    result = engine.run(lambda dd: fn(dd, *args))  # as the commands do: the gloo group destroyed after a good run
    torch.save(result, Path(results) / f"rank{rank}.pt")


def two_ranks(fn, tmp_path, *args, timeout=CEILING_S):
    """fn(dd, *args) in 2 processes of a gloo group -> their results; fails when they have not ended in `timeout` s."""
    results = tmp_path / f"results{time.monotonic_ns()}"
    results.mkdir()
    ctx = mp.start_processes(
        _ranked, args=(2, free_port(), str(results), fn, args), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the 2 ranks still run after {timeout} s")
    return [torch.load(results / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def _one_rank_goes_non_finite(dd, out_dir):
    return tiny_fit(dd, out_dir, tiny_set(64, dd.rank, nan=dd.rank == 1), epochs=2)


def _one_rank_meets_bad_data(dd):
    try:
        with engine.together(dd):
            if dd.rank == 1:
                raise data.BadImageFile("img_7.jpg is not a readable image")
        return "no error"
    except engine.UserError as e:
        return str(e)


@pytest.mark.slow
def test_a_data_error_on_one_rank_stops_every_rank_with_its_line(tmp_path):
    assert two_ranks(_one_rank_meets_bad_data, tmp_path) == ["img_7.jpg is not a readable image"] * 2


@pytest.mark.slow
def test_a_non_finite_loss_on_one_rank_stops_both_with_the_same_line(tmp_path):
    lines = two_ranks(_one_rank_goes_non_finite, tmp_path, tmp_path / "run")  # a hang would last DIST_TIMEOUT
    assert lines[0] == lines[1] and "loss is nan at step 1 on rank 1; stopping (no checkpoint yet)" in lines[0]


def _held_out_metrics(dd):
    model, held_out = Tiny(), tiny_set(101, 5)
    return engine.evaluate(model, engine.make_loader(held_out, 8, dd, 0, 0, False), dd, seed=0)


@pytest.mark.slow
def test_held_out_metrics_over_two_ranks_count_each_item_once(tmp_path):
    one = _held_out_metrics(engine.Dist(0, 0, 1, torch.device("cpu")))
    two = two_ranks(_held_out_metrics, tmp_path)  # 101 items: DistributedSampler would add item 0 a second time
    x, y = tiny_set(101, 5).tensors
    correct = (Tiny().fc(x.flatten(1)).argmax(-1) == y).sum().item()
    assert two[0] == two[1] and two[0] == pytest.approx(one, rel=1e-6) and one["acc"] == pytest.approx(correct / 101)


def _compile_records(dd, out_dir):
    compiled, compile = [], torch.compile

    def compile_eagerly(model):  # dynamo traces DDP and its no_sync; no C++ compiler on a CPU test
        compiled.append(type(model).__name__)
        return compile(model, backend="eager")

    torch.compile = compile_eagerly
    return compiled, tiny_fit(dd, out_dir, tiny_set(64, dd.rank), compile=True, accum=2)


@pytest.mark.slow
def test_compile_wraps_the_ddp_module_so_gradient_all_reduces_overlap_the_backward(tmp_path):
    (compiled, a), (_, b) = two_ranks(_compile_records, tmp_path, tmp_path / "run")
    assert compiled == ["DistributedDataParallel"]
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["fc.weight"], Tiny().fc.weight)


def _bad_first_batch_on_rank_1(dd, out_dir):
    fetched = [0]

    class FirstBatchUnreadable(TensorDataset):
        def __getitem__(self, i):
            fetched[0] += 1
            if dd.rank == 1 and fetched[0] <= 8:
                raise data.BadImageFile(f"item {i} unreadable")
            return super().__getitem__(i)

    train_set = data.SkipBadFiles(FirstBatchUnreadable(*tiny_set(64, dd.rank).tensors))
    return tiny_fit(dd, out_dir, train_set)


@pytest.mark.slow
def test_a_rank_whose_whole_batch_is_unreadable_takes_every_step_with_the_others(tmp_path):
    a, b = two_ranks(_bad_first_batch_on_rank_1, tmp_path, tmp_path / "run")
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["fc.weight"], Tiny().fc.weight)
    assert [r["step"] for r in log_rows(tmp_path / "run") if "img_per_s" in r] == [1, 2, 3, 4]


def _own_out_dirs(dd, tmp_path):
    """Node-local out-dirs: rank 0 writes rank0/ and rank 1 sees rank1/; the ranks go on after a engine.UserError."""
    out = tmp_path / f"rank{dd.rank}"
    tiny_fit(dd, out, tiny_set(64, dd.rank), epochs=1)
    before = checksums(tmp_path / "rank0")
    line = tiny_fit(dd, out, tiny_set(64, dd.rank), epochs=2)
    refused = line, checksums(tmp_path / "rank0") == before
    if dd.main:  # now both see the same checkpoint
        (tmp_path / "rank1").mkdir()
        (tmp_path / "rank1" / "checkpoint.pt").write_bytes((tmp_path / "rank0" / "checkpoint.pt").read_bytes())
    torch.distributed.barrier()
    return refused, tiny_fit(dd, out, tiny_set(64, dd.rank), epochs=2)


@pytest.mark.slow
def test_ranks_that_see_different_out_dirs_stop_with_one_line_and_resume_when_they_agree(tmp_path):
    ((line, kept), a), ((other_line, _), b) = two_ranks(_own_out_dirs, tmp_path, tmp_path)
    assert line == other_line and f"rank 1 sees no checkpoint at {tmp_path / 'rank1' / 'checkpoint.pt'}" in line
    assert "where rank 0 resumes from step 4" in line and kept
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.load(tmp_path / "rank0" / "checkpoint.pt", weights_only=True)["epoch"] == 2


def test_a_leaked_launcher_variable_or_patched_probe_is_seen():
    before = global_state()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RANK", "5")
        assert global_state() != before
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: True)
        assert global_state() != before
    assert global_state() == before


@pytest.fixture
def tf32_flags():
    """The two fp32 precisions set to IEEE, and put back as they were: properties that monkeypatch cannot undo."""
    flags = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)
    saved = [f.fp32_precision for f in flags]
    for f in flags:
        f.fp32_precision = "ieee"
    yield
    for f, value in zip(flags, saved):
        f.fp32_precision = value


def test_setup_takes_a_visible_gpu_one_timeout_and_tf32(monkeypatch, tf32_flags):
    calls = {}
    for name, value in (("RANK", "5"), ("LOCAL_RANK", "3"), ("WORLD_SIZE", "8")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # SLURM: each task sees one GPU
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.update(device=device))
    monkeypatch.setattr(engine, "attempt_store", lambda: "store", raising=False)
    monkeypatch.setattr(engine.dist, "init_process_group", lambda backend, **kw: calls.update(backend=backend, **kw))
    monkeypatch.setattr(engine.dist, "new_group", lambda **kw: calls.update(flags=kw) or "gloo group")
    dd = engine.setup_distributed()
    assert dd.device == calls["device"] == torch.device("cuda", 0) and (dd.rank, dd.world) == (5, 8)
    assert calls["backend"] == "nccl" and calls["timeout"].total_seconds() >= 30 * 60
    assert calls["flags"] == {"backend": "gloo", "timeout": calls["timeout"]} and dd.flags == "gloo group"
    assert torch.backends.cuda.matmul.fp32_precision == torch.backends.cudnn.conv.fp32_precision == "tf32"


def test_srun_s_task_variables_become_torchrun_s_and_one_task_stays_one_process():
    env = {"SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NTASKS": "16", "SLURM_TASKS_PER_NODE": "8(x2)",
           "SLURM_JOB_NODELIST": "gpu[07-08,12],cpu01", "SLURM_JOB_ID": "123456"}
    engine.from_slurm(env)
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == ("9", "1", "16", "8")
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("gpu07", "23456")
    assert [engine.first_host(n) for n in ("node01", "cpu01,gpu[1-2]", "n[001-004]")] == ["node01", "cpu01", "n001"]
    given = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "a[1-2]",
             "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    engine.from_slurm(given)
    assert (given["MASTER_ADDR"], given["MASTER_PORT"]) == ("10.0.0.1", "29500")  # what the user set wins
    for alone in ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, {"RANK": "3", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}):
        before = dict(alone)
        engine.from_slurm(alone)  # one task, or torchrun's variables already there (torchrun inside an allocation)
        assert alone == before


# ---------------------------------------------------------------- #24: two processes under torchrun

LAUNCHER = '''"""train.py under torchrun; in the first attempt, rank 1 is killed (SIGKILL) once step 22, step 2
of epoch 2, is logged, and in the second it reaches the process group 3 s after rank 0, as on another node."""
import os, signal, sys, threading, time
sys.path.insert(0, os.environ["REPO"])
import train
attempt, rank = int(os.environ["TORCHELASTIC_RESTART_COUNT"]), int(os.environ["RANK"])
log = sys.argv[-1] + "/log.jsonl"  # --out-dir comes last

def dies_at_step_22():
    while not (os.path.exists(log) and '"step": 22,' in open(log).read()):
        time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGKILL)

if attempt == 0 and rank == 1:
    threading.Thread(target=dies_at_step_22, daemon=True).start()
if attempt == 1 and rank == 1:
    time.sleep(3)
sys.argv[0] = "train.py"
train.main()
'''


def torchrun(args, out_dir, script=REPO / "train.py", restarts=0):
    """`torchrun --nproc_per_node=2 script args --out-dir out_dir`, started."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master-port={free_port()}",
            f"--max-restarts={restarts}",
            str(script),
            *map(str, args),
            "--out-dir",
            str(out_dir),
        ],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", "REPO": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture(scope="module")
def two_rank_run(long_epochs, tmp_path_factory):
    """An uninterrupted 2-epoch run of 2 ranks (20 steps of 8 images each an epoch) -> its args and weights."""
    common, _ = long_epochs
    out = tmp_path_factory.mktemp("two_ranks")
    output = torchrun(common, out).communicate(timeout=CEILING_S)[0]
    assert (out / "checkpoint.pt").exists(), output
    return common, torch.load(out / "checkpoint.pt", weights_only=True)["model"]


@pytest.mark.slow
def test_torchrun_sigterm_mid_epoch_checkpoints_on_both_ranks_and_a_rerun_ends_as_an_uninterrupted_run(
    two_rank_run, tmp_path
):
    common, whole = two_rank_run
    proc = torchrun(common, tmp_path)
    wait_for_step(tmp_path, 3, proc)
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks
    output = proc.communicate(timeout=CEILING_S)[0]
    stopped = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert stopped["epoch"] == 0 and 3 <= stopped["epoch_step"] < 20
    errors = re.findall(r"Error: [^\r\n]*", output)  # rank 1's line may follow rank 0's progress bar on a line
    assert len(errors) == 2 and errors[0] == errors[1] and f"at step {stopped['step']}" in errors[0], output[-3000:]
    output = torchrun(common, tmp_path).communicate(timeout=CEILING_S)[0]
    assert f"and {stopped['epoch_step']} steps of epoch 1" in output
    model = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(model[k], whole[k]) for k in whole)
    assert [r["step"] for r in log_rows(tmp_path) if "img_per_s" in r] == list(range(1, 41))


@pytest.mark.slow
def test_two_tasks_started_as_srun_starts_them_train_one_run_equal_to_torchrun_s(two_rank_run, tmp_path):
    common, whole = two_rank_run
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    slurm = {"SLURM_NTASKS": "2", "SLURM_TASKS_PER_NODE": "2", "SLURM_JOB_NODELIST": "localhost",
             "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    tasks = [
        subprocess.Popen(
            [sys.executable, "train.py", *map(str, common), "--out-dir", str(tmp_path)], cwd=REPO,
            env={**env, **slurm, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )
        for r in (0, 1)
    ]
    outputs = [task.communicate(timeout=CEILING_S)[0] for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], outputs
    assert "x 2 processes" in outputs[0]
    model = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(model[k], whole[k]) for k in whole)


@pytest.mark.slow
def test_a_run_whose_output_is_a_file_prints_plain_progress_lines(fake_fmnist, tmp_path):
    log = tmp_path / "slurm-42.out"
    with open(log, "w") as out:
        subprocess.run(
            [sys.executable, "train.py", "pretrain", "--data-dir", str(fake_fmnist), *map(str, TINY_RUN), "--epochs", "2",
             "--log-every", "2", "--out-dir", str(tmp_path / "run")],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, check=True,
        )
    text = log.read_text()
    lines = [line for line in text.splitlines() if re.match(r"epoch \d+/\d+ step ", line)]  # not the epochs' summaries
    assert "\r" not in text and [line.split()[3] for line in lines] == ["2/6", "4/6", "6/6"], text
    assert all(re.search(r"loss \S+ lr \S+ img/s \d+ data \d+% eta \S+ min$", line) for line in lines), lines


@pytest.mark.slow
def test_torchrun_restarts_a_killed_rank_with_one_rank_late_and_ends_as_an_uninterrupted_run(two_rank_run, tmp_path):
    common, whole = two_rank_run
    (tmp_path / "launch.py").write_text(LAUNCHER)
    for attempt in range(2):  # the last attempt's rendezvous keys once broke 2 restarts in 3
        out = tmp_path / f"run{attempt}"
        proc = torchrun(common, out, tmp_path / "launch.py", restarts=1)
        output = proc.communicate(timeout=CEILING_S)[0]
        assert proc.returncode == 0 and "resuming from" in output, output[-3000:]
        model = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
        assert all(torch.equal(model[k], whole[k]) for k in whole)


def test_run_json_records_the_command_commit_and_world_and_lr_overrides_blr(fake_fmnist, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/somewhere/train.py", "pretrain", "--lr", "3e-4"])  # as the shell would run it
    result = invoke("pretrain", "--data-dir", fake_fmnist, *TINY_RUN, "--epochs", 1, "--lr", 3e-4, "--out-dir", tmp_path / "run")
    assert result.exit_code == 0 and "lr 0.0003 (--lr)" in result.output, result.output
    start = json.loads((tmp_path / "run" / "run.json").read_text())["starts"][0]
    assert start["argv"] == ["train.py", "pretrain", "--lr", "3e-4"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(engine.__file__).parent, capture_output=True, text=True)
    assert start["commit"] == head.stdout.strip() and isinstance(start["dirty"], bool)
    assert start["versions"]["torch"] == importlib.metadata.version("torch")
    assert (start["world_size"], start["effective_batch"], start["lr"]) == (1, 32, pytest.approx(3e-4))
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["config"]["record"]["lr"] == pytest.approx(3e-4) and ckpt["config"]["recipe"]["world_size"] == 1


def test_a_peak_lr_below_the_min_lr_is_named_on_the_start_line(fake_fmnist, tmp_path):
    result = invoke("pretrain", "--data-dir", fake_fmnist, *TINY_RUN, "--epochs", 1, "--lr", 1e-7, "--out-dir", tmp_path)
    assert result.exit_code == 0 and "lr 1e-07 (--lr), below --min-lr 1e-06: the cosine rises to it" in result.output
    result = invoke("pretrain", "--data-dir", fake_fmnist, *TINY_RUN, "--epochs", 1, "--out-dir", tmp_path / "default")
    assert result.exit_code == 0 and "below --min-lr" not in result.output, result.output


@pytest.mark.slow
def test_a_resume_on_another_number_of_processes_stops_unless_told(fake_fmnist, tmp_path):
    common = ["pretrain", "--data-dir", fake_fmnist, *TINY_RUN, "--epochs", 1]
    output = torchrun(common, tmp_path / "run").communicate(timeout=CEILING_S)[0]
    assert (tmp_path / "run" / "checkpoint.pt").exists(), output
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    result = invoke(*common, "--epochs", 2, "--out-dir", tmp_path / "run")  # one process now, half the batch
    assert one_line_error(result, "world_size: 2 -> 1", "effective_batch: 64 -> 32", "--resume-changed"), result.output
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before
    result = invoke(*common, "--epochs", 2, "--resume-changed", "--out-dir", tmp_path / "run")
    assert result.exit_code == 0, result.output


TIMINGS = {"img_per_s", "data_share", "epoch_s", "peak_mem_gib"}


@pytest.mark.slow
def test_a_run_killed_at_20_random_moments_resumes_to_the_weights_and_log_of_an_uninterrupted_one(long_epochs, tmp_path):
    """Finetuning (a best checkpoint in play) killed with SIGKILL 20 times at random moments, writes included
    (--save-every-min saves about every step), each time rerun: it ends as the run that was never killed."""
    common = ["finetune", "--init", "scratch", "--data-dir", long_epochs[0][2], "--preset", "vit_test", "--batch-size", 8,
              "--epochs", 40, "--log-every", 1, "--warmup-epochs", 0.5, "--save-every-min", 0.0002]
    assert invoke(*common, "--out-dir", tmp_path / "whole").exit_code == 0
    command = [sys.executable, "train.py", *map(str, common), "--out-dir", str(tmp_path / "killed")]
    log, rng, kills = tmp_path / "killed" / "log.jsonl", random.Random(0), 0
    while kills < 20:
        written = log.stat().st_mtime_ns if log.exists() else 0
        proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and (log.stat().st_mtime_ns if log.exists() else 0) == written:
            time.sleep(0.01)  # until this attempt trains (its log moves), whatever the machine's speed
        if proc.poll() is not None:
            break  # it finished before this kill
        time.sleep(rng.uniform(0.0, 0.5))  # a random moment of training: checkpoint writes are about every step
        proc.kill()
        proc.wait()
        kills += 1
    assert kills == 20
    assert subprocess.run(command, cwd=REPO, capture_output=True).returncode == 0
    for name in ("checkpoint.pt", "checkpoint_best.pt"):
        whole, killed = (torch.load(tmp_path / d / name, weights_only=True) for d in ("whole", "killed"))
        assert whole["best"] == killed["best"] and all(torch.equal(whole["model"][k], killed["model"][k]) for k in whole["model"])
    rows = [[{k: v for k, v in r.items() if k not in TIMINGS} for r in log_rows(tmp_path / d)] for d in ("whole", "killed")]
    assert rows[0] == rows[1]


def test_the_log_of_an_attempt_killed_before_its_first_checkpoint_is_not_kept(fake_fmnist, tmp_path):
    (tmp_path / "log.jsonl").write_text(json.dumps({"epoch": 1, "step": 1, "lr": 0.1, "loss": 9.0}) + "\n")  # a dead attempt's
    assert invoke("pretrain", "--data-dir", fake_fmnist, *TINY_RUN, "--epochs", 1, "--out-dir", tmp_path).exit_code == 0
    steps = [r["step"] for r in log_rows(tmp_path) if "loss" in r]
    assert steps == sorted(set(steps)) and steps[0] == 1 and 9.0 not in [r["loss"] for r in log_rows(tmp_path) if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("dies_at", ["the last step's save", "the epoch's end save"])
def test_a_checkpoint_at_an_epochs_last_step_resumes_to_that_epochs_end(long_epochs, tmp_path, monkeypatch, dies_at):
    """A mid-epoch checkpoint at the epoch's last step (step 40 of 40), then a kill right after it, or after the
    epoch's summary row is logged but before its end checkpoint is written: the rerun ends the epoch once."""
    common, whole = long_epochs  # 40 steps an epoch, 2 epochs; --save-every-min 1e-7 saves after every step
    save = engine.save_checkpoint

    def save_then_die(path, state):
        last_step = state.get("epoch_step") == state.get("steps_per_epoch")
        epoch_end = state.get("epoch") == 1 and state.get("epoch_step") == 0
        if dies_at == "the last step's save" or not epoch_end:
            save(path, state)
        if (last_step and dies_at == "the last step's save") or (epoch_end and dies_at == "the epoch's end save"):
            raise KeyboardInterrupt

    monkeypatch.setattr(engine, "save_checkpoint", save_then_die)
    assert invoke(*common, "--save-every-min", 1e-7, "--out-dir", tmp_path).exit_code != 0
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch_step"] == 40
    monkeypatch.undo()
    assert invoke(*common, "--save-every-min", 1e-7, "--out-dir", tmp_path).exit_code == 0
    model = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(model[k], whole[k]) for k in whole)
    assert [r["epoch"] for r in log_rows(tmp_path) if "epoch_s" in r] == [1, 2]  # each epoch's summary once
    assert [r["step"] for r in log_rows(tmp_path) if "img_per_s" in r] == list(range(1, 81))
