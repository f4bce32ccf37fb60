"""The training loop of every command (train.py, sleep1d.py and detect.py build a model and data, then call `fit`),
and below it the run's hygiene: distributed setup, the out-dir lock, atomic checkpoints, signals, resume.

    fit: loaders -> AdamW -> lock -> resume -> wrap (DDP, compile) -> epochs of train_one_epoch + evaluate + save

A model is anything whose forward(x, y) returns (loss, metrics). What a run survives: README, "What is safe".
"""

import fcntl
import hashlib
import importlib.metadata
import itertools
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

# ---------------------------------------------------------------- the loop


def fit(
    model, train_set, val_set, recipe, out_dir, config, dd, best_key=None, evaluate_fn=None, collate_fn=None,
    train_collate_fn=None, precision=None, on_epoch=None,
):
    """Train model, resuming from out_dir's checkpoint.pt, -> the last held-out metrics. out_dir gets checkpoint.pt,
    checkpoint_best.pt (when metrics[best_key] rises) and log.jsonl; train_collate_fn batches training alone (MixUp)."""
    out_dir, precision = Path(out_dir), precision or autocast
    evaluate_fn = evaluate_fn or partial(evaluate, precision=precision)
    train_collate_fn = train_collate_fn or collate_fn
    train_loader = make_loader(train_set, recipe.batch_size, dd, recipe.seed, recipe.workers, True, train_collate_fn)
    val_loader = make_loader(val_set, recipe.batch_size, dd, recipe.seed, recipe.workers, False, collate_fn)
    steps_per_epoch, eff_batch, lr, schedule = lr_schedule(recipe, len(train_loader), dd.world)
    model.to(dd.device)
    groups = param_groups(model, recipe.weight_decay, recipe.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, recipe.beta2))
    config = with_record(config, recipe, dd, eff_batch, lr)
    save = partial(save_run, dd, out_dir, model, optimizer, config, steps_per_epoch)
    with out_dir_lock(out_dir, dd), stop_on_signals() as signals:
        first_epoch, first_step, best, metrics = resume(out_dir, model, optimizer, config, dd, steps_per_epoch)
        if first_epoch >= recipe.epochs:
            if dd.main:
                print(f"{out_dir / 'checkpoint.pt'} is a finished run of {first_epoch} epochs: nothing to train "
                      "(raise --epochs to continue it)")
            return metrics
        if dd.main:
            write_record(out_dir, config)
            print(describe_start(recipe, dd, eff_batch, lr, steps_per_epoch))
        wrapped, t_run = wrap(model, recipe, dd), time.perf_counter()
        purge_step = first_epoch * steps_per_epoch + first_step + 1  # the first step this start logs
        with RunLog(out_dir, recipe.tensorboard, purge_step) if dd.main else nullcontext() as log:
            for epoch in range(first_epoch, recipe.epochs):
                step = first_step if epoch == first_epoch else 0
                train_loader.sampler.set_epoch(epoch)
                train_loader.sampler.skip = step * recipe.accum * recipe.batch_size
                if on_epoch:
                    on_epoch(epoch, recipe.epochs)
                t_epoch = time.perf_counter()
                train_one_epoch(
                    wrapped, train_loader, optimizer, schedule, precision, recipe, dd, epoch, step, steps_per_epoch,
                    out_dir, signals, log, partial(save, best=best, metrics=metrics),
                )
                agree_on_buffers(model, dd)
                metrics = evaluate_fn(model, val_loader, dd, recipe.seed)
                summary = {"epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch,
                           "epoch_s": time.perf_counter() - t_epoch, **{f"val_{k}": v for k, v in metrics.items()}}
                left = recipe.epochs - epoch - 1
                eta = (time.perf_counter() - t_run) / (epoch + 1 - first_epoch) * left if left else None
                improved = report_epoch(dd, summary, log, eta, metrics, best_key, best)
                best = metrics[best_key] if improved else best
                save(epoch + 1, 0, best, metrics, improved)
                if agree(dd, signals)[0] and left:
                    stop(dd, signals, out_dir, f"after epoch {epoch + 1}")
    return metrics


def train_one_epoch(
    model, loader, optimizer, schedule, precision, recipe, dd, epoch, first_step, steps_per_epoch, out_dir, signals,
    log, save,
):
    """Optimizer steps first_step.. of an epoch; micro-batch i seeded by (seed, rank, epoch, i): a resume repeats it."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    micro_batches, first = steps_per_epoch * recipe.accum, first_step * recipe.accum
    bar = progress(loader, dd, desc=f"epoch {epoch + 1}/{recipe.epochs}", initial=first, total=micro_batches)
    saved_at, t_log, t_data, n_img, logged = time.monotonic(), time.perf_counter(), 0.0, 0, first_step
    t0 = t_log
    for i, batch in enumerate(bar, start=first):
        if i >= micro_batches:  # the last batches that fill no optimizer step
            break
        x, y = to_device(batch, dd.device)
        t_data += time.perf_counter() - t0
        torch.manual_seed(derive_seed(recipe.seed, dd.rank, epoch, i))
        last_micro = (i + 1) % recipe.accum == 0
        with nullcontext() if last_micro or dd.world == 1 else model.no_sync():  # DDP syncs the last one
            with precision(dd.device):
                loss, metrics = model(x, y)
            (loss / recipe.accum).backward()
        n_img += len(x) * dd.world
        if last_micro:
            epoch_step = i // recipe.accum + 1
            step = epoch * steps_per_epoch + epoch_step  # optimizer steps done, this one included
            step_lr = schedule(step - 1)
            optimizer_step(model, optimizer, step_lr, recipe.clip_grad)
            logging = step % recipe.log_every == 0
            value = loss.item() if logging else 0.0  # .item() waits for the GPU: at log steps only
            due = dd.main and recipe.save_every_min > 0 and time.monotonic() - saved_at > 60 * recipe.save_every_min
            stopping, due, bad = agree(dd, signals, due, not math.isfinite(value))
            check_finite(dd, value, step, bad, out_dir)
            if logging and dd.main:
                elapsed = time.perf_counter() - t_log
                row = {"epoch": epoch + 1, "step": step, "lr": step_lr, **{k: v.item() for k, v in metrics.items()},
                       "img_per_s": n_img / elapsed, "data_share": t_data / elapsed}
                bar.set_postfix(loss=f"{value:.4f}", img_s=f"{row['img_per_s']:.0f}")
                log.write(row)
                if bar.disable:  # no terminal: a plain line a scheduler's log keeps
                    left_s = (recipe.epochs * steps_per_epoch - step) * elapsed / (epoch_step - logged)
                    print(progress_line(row, value, recipe.epochs, recipe.epochs * steps_per_epoch, left_s))
            if logging:
                t_log, t_data, n_img, logged = time.perf_counter(), 0.0, 0, epoch_step
            if stopping or due:
                save(epoch, epoch_step)
                saved_at = time.monotonic()
            if stopping:
                where = f"at step {step} (step {epoch_step} of {steps_per_epoch} in epoch {epoch + 1})"
                stop(dd, signals, out_dir, where)
        t0 = time.perf_counter()
    if first < micro_batches:  # else the run resumed at the epoch's last step, and only the epoch's end is left
        value = loss.item()
        check_finite(dd, value, (epoch + 1) * steps_per_epoch, agree(dd, not math.isfinite(value))[0], out_dir)


def progress(iterable, dd, **kwargs):
    """rank 0's tqdm bar at a terminal; none where the output goes to a file (a SLURM .out), which gets plain lines."""
    return tqdm(iterable, disable=not dd.main or not sys.stderr.isatty(), leave=False, **kwargs)


def progress_line(row, loss, epochs, total_steps, left_s):
    """A log step as one line: epoch, step of all, loss, lr, images/s, data-loading share, time left, peak memory."""
    line = (f"epoch {row['epoch']}/{epochs} step {row['step']}/{total_steps} loss {loss:.4f} lr {row['lr']:.3g} "
            f"img/s {row['img_per_s']:.0f} data {row['data_share']:.0%} eta {left_s / 60:.1f} min")
    if torch.cuda.is_available():
        line += f" mem {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    return line


def optimizer_step(model, optimizer, lr, clip_grad):
    """Each group at lr times its lr_scale (layer decay), gradients clipped to clip_grad when > 0."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g["lr_scale"]
    if clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def check_finite(dd, loss, step, bad, out_dir):
    """bad (agreed by all ranks): some rank's loss is non-finite; every rank then stops with the same line."""
    if not bad:
        return
    values = gather(dd, loss)
    rank = next(i for i, v in enumerate(values) if not math.isfinite(v))
    ckpt = out_dir / "checkpoint.pt"
    last = f"the last good checkpoint is {ckpt}" if ckpt.exists() else "no checkpoint yet"
    where = f" on rank {rank}" if dd.world > 1 else ""
    fail(f"loss is {values[rank]} at step {step}{where}; stopping ({last}). Try a lower --blr or --clip-grad 1.0")


def stop(dd, signals, out_dir, where):
    """Every rank stops with one line naming the signal, once the checkpoint of `where` is written."""
    name = next(n for n in gather(dd, signals[0][0] if signals else None) if n)
    ckpt = out_dir / "checkpoint.pt"
    fail(f"stopped by {name} {where}; {ckpt} holds the run: rerun the same command to resume from there")


def report_epoch(dd, summary, log, eta_s, metrics, best_key, best):
    """Rank 0 prints and logs the epoch's summary row -> whether metrics[best_key] beat best (False elsewhere)."""
    improved = False
    with together(dd):
        if dd.main:
            if torch.cuda.is_available():
                summary["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            line = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items())
            print(line + (f"; about {eta_s / 60:.1f} min to go" if eta_s is not None else ""))
            log.write(summary)
            if best_key is not None and best_key not in metrics:
                fail(f"the held-out evaluation gave no {best_key!r} to keep the best checkpoint by "
                     f"(it gave {', '.join(metrics) or 'nothing'})")
            improved = best_key is not None and metrics[best_key] > best
    return improved


def save_run(dd, out_dir, model, optimizer, config, steps_per_epoch, epochs_done, epoch_step, best, metrics,
             improved=False):
    """The run after epochs_done epochs + epoch_step steps, by rank 0; the best first, so it never trails the last."""
    with together(dd):
        if dd.main:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epochs_done,
                     "epoch_step": epoch_step, "step": epochs_done * steps_per_epoch + epoch_step,
                     "steps_per_epoch": steps_per_epoch, "config": config, "best": best, "metrics": metrics}
            if improved:
                save_checkpoint(out_dir / "checkpoint_best.pt", state)
            save_checkpoint(out_dir / "checkpoint.pt", state)


# ---------------------------------------------------------------- what the loop is made of


@dataclass
class Recipe:
    """Optimisation settings shared by every command; each is a CLI flag."""

    epochs: int = 100
    batch_size: int = 256  # per process
    accum: int = 1  # gradient accumulation steps
    blr: float = 1.25e-4  # base lr; lr = blr * effective batch / 256 (MAE). The paper: 5e-4 at batch 1024 (8.1)
    lr: float = 0.0  # the peak lr itself, in place of blr's rule (MAE's --lr); 0: from blr
    min_lr: float = 1e-6
    warmup_epochs: float = 5.0
    weight_decay: float = 0.05
    layer_decay: float = 1.0  # layer-wise lr decay; 1.0 is off
    beta2: float = 0.95  # AdamW's second-moment decay: 0.95 in pretraining (MAE), 0.999 in finetuning (DeiT, MAE)
    clip_grad: float = 0.0  # max grad norm; 0 is off
    workers: int = -1  # data-loader workers per process; -1: 8 on CUDA, 0 on CPU
    seed: int = 0
    compile: bool = False
    grad_ckpt: bool = False  # activation checkpointing in the ViT blocks: less memory, ~1/3 more compute
    log_every: int = 50  # optimizer steps
    save_every_min: float = 0.0  # also checkpoint within an epoch every this many minutes; 0: at epoch ends only
    lr_drops: tuple = ()  # a step schedule: epochs where the lr drops x0.1, e.g. (8, 11) (Detectron's 1x); (): cosine
    resume_changed: bool = False  # resume a run whose checkpoint has another recipe, with the new values
    tensorboard: bool = False  # also log.jsonl's rows as TensorBoard scalars in out_dir/tensorboard


def lr_at(step, lr, warmup_steps, total_steps, min_lr, drop_steps=()):
    """Linear warmup, then cosine decay to min_lr, or x0.1 at each of drop_steps (a step schedule)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if drop_steps:
        return lr * 0.1 ** sum(step >= s for s in drop_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def lr_schedule(recipe, batches, world):
    """-> optimizer steps per epoch, effective batch, peak lr (--lr, else MAE's blr x batch / 256), step -> lr."""
    steps_per_epoch = batches // recipe.accum
    if steps_per_epoch == 0:
        fail(f"--accum {recipe.accum} is more than the {batches} batches of an epoch")
    eff_batch = recipe.batch_size * recipe.accum * world
    lr = recipe.lr or recipe.blr * eff_batch / 256
    schedule = partial(lr_at, lr=lr, warmup_steps=int(recipe.warmup_epochs * steps_per_epoch),
                       total_steps=recipe.epochs * steps_per_epoch, min_lr=recipe.min_lr,
                       drop_steps=[int(e * steps_per_epoch) for e in recipe.lr_drops])
    return steps_per_epoch, eff_batch, lr, schedule


def describe_start(recipe, dd, eff_batch, lr, steps_per_epoch):
    """The line that opens a run: the batch arithmetic and the lr it gives."""
    lr_from = f"lr {lr:.3g} (--lr)" if recipe.lr else f"base lr {recipe.blr:.3g} -> lr {lr:.3g}"
    below = f", below --min-lr {recipe.min_lr:.3g}: the cosine rises to it" if lr < recipe.min_lr else ""
    return (f"batch {recipe.batch_size}/process x {dd.world} processes x {recipe.accum} accumulation = {eff_batch} "
            f"effective; {lr_from}{below}; {steps_per_epoch} steps/epoch, {recipe.epochs * steps_per_epoch} steps in "
            f"all; device {dd.device}")


def layer_id(name, depth):
    """0 for embeddings and tokens, i+1 for blocks.i, depth+1 after the blocks (BEiT); names read after "encoder."."""
    name = name.rpartition("encoder.")[2]
    if name.startswith(("patch_embed", "cls_token", "pos_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups(model, weight_decay, layer_decay):
    """AdamW groups: no decay where ndim < 2 (norms, biases) or on tokens; lr x layer_decay ** (depth + 1 - layer)."""
    depth = max((layer_id(n, -1) for n, _ in model.named_parameters()), default=0)  # blocks; -1: none after them
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and not name.endswith(("cls_token", "pos_embed"))
        layer = layer_id(name, depth)
        if (layer, decay) not in groups:
            scale = layer_decay ** (depth + 1 - layer)
            groups[layer, decay] = {"params": [], "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale}
        groups[layer, decay]["params"].append(p)
    return list(groups.values())


def autocast(device):
    """bf16 autocast on CUDA (no GradScaler needed), plain fp32 on CPU; detection passes its own precision."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def wrap(model, recipe, dd):
    """DDP, then torch.compile of the DDP module: compiled so, DDP's graph splits at its buckets and gradient
    all-reduces overlap the backward (compiling first and wrapping after leaves them to the end)."""
    if dd.world > 1:
        model = DDP(model, device_ids=[dd.device.index] if dd.device.type == "cuda" else None)
    return torch.compile(model) if recipe.compile else model


def agree_on_buffers(model, dd):
    """Every rank takes rank 0's buffers (BatchNorm's): DDP syncs them before a forward, not after the last step."""
    if dd.world > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


@torch.no_grad()
def evaluate(model, loader, dd, seed, precision=autocast):
    """Held-out metrics averaged over all ranks' items, under a fixed seed (PART's pairs) so epochs compare alike."""
    model.eval()
    sums, count = {}, 0
    devices = [dd.device] if dd.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for batch in progress(loader, dd, desc="eval"):
            x, y = to_device(batch, dd.device)
            with precision(dd.device):
                _, metrics = model(x, y)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + v.double() * len(x)
            count += len(x)
    model.train()
    shards = gather(dd, ({k: v.item() for k, v in sums.items()}, count))  # a rank may hold no batch at all
    count = sum(n for _, n in shards)
    names = dict.fromkeys(k for s, _ in shards for k in s)
    return {k: sum(s.get(k, 0.0) for s, _ in shards) / count for k in names}


def derive_seed(*parts):
    """A 63-bit seed from integers, e.g. (seed, epoch, index): unrelated seeds for different parts."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


class Seeded(Dataset):
    """dataset[(index, seed)], the RNG seeded first: an item's augmentation depends on (seed, epoch, index) alone."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        torch.default_generator.manual_seed(seed)
        return self.dataset[index]


class TrainSampler(DistributedSampler):
    """DistributedSampler's order as (index, seed) pairs for `Seeded`, from item `skip` on (a part-way resume)."""

    skip = 0

    def __iter__(self):
        for index in itertools.islice(super().__iter__(), self.skip, None):
            yield index, derive_seed(self.seed, self.epoch, index)

    def __len__(self):
        return self.num_samples - self.skip


def to_device(batch, device):
    """Tensors, and lists / tuples / dicts of them (detection targets), onto the device."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def make_loader(dataset, batch_size, dd, seed, workers, train, collate_fn=None):
    """Each rank its shard in (seed, epoch) order; held-out items r, r + world, ... (DistributedSampler pads)."""
    if train and len(dataset) // dd.world < batch_size:
        fail(f"--batch-size {batch_size} is larger than the {len(dataset) // dd.world} training images per process")
    if train:
        sampler = TrainSampler(dataset, num_replicas=dd.world, rank=dd.rank, shuffle=True, seed=seed, drop_last=True)
        dataset = Seeded(dataset)
    else:
        sampler = range(dd.rank, len(dataset), dd.world)
    workers = (8 if dd.device.type == "cuda" else 0) if workers < 0 else workers
    return DataLoader(
        dataset, batch_size, sampler=sampler, num_workers=workers, pin_memory=dd.device.type == "cuda", drop_last=train,
        persistent_workers=workers > 0, collate_fn=collate_fn,
    )


# ---------------------------------------------------------------- distributed setup and errors

DIST_TIMEOUT = timedelta(minutes=60)  # per collective: the others wait while rank 0 evaluates (COCOeval) or saves


@dataclass(frozen=True)
class Dist:
    rank: int
    local_rank: int
    world: int
    device: torch.device
    flags: object = None  # the process group of small CPU collectives (stop flags, errors): gloo; None: the default

    @property
    def main(self):
        return self.rank == 0


def local_device():
    """This process's device when not launched by torchrun: the GPU if there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def setup_distributed():
    """Distributed when torchrun or srun launched us, else one process; rank r on GPU LOCAL_RANK % visible GPUs."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    from_slurm(os.environ)
    if "RANK" not in os.environ:
        return Dist(0, 0, 1, local_device())
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    device = local_device()
    if device.type == "cuda":
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=attempt_store(), rank=rank, world_size=world, timeout=DIST_TIMEOUT)
    flags = dist.new_group(backend="gloo", timeout=DIST_TIMEOUT) if backend == "nccl" else None
    return Dist(rank, local_rank, world, device, flags)


def from_slurm(env):
    """torchrun's variables from SLURM's where srun started one process per task (as timm and MAE map them); the
    rendezvous on the job's first node, at a port derived from the job id. A job of one task stays one process."""
    if "RANK" in env or "SLURM_PROCID" not in env or int(env.get("SLURM_NTASKS", 1)) < 2:
        return
    env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_LOCALID"], env["SLURM_NTASKS"]
    env["LOCAL_WORLD_SIZE"] = re.match(r"\d+", env.get("SLURM_TASKS_PER_NODE", "1"))[0]  # "8(x2)": 8 on each node
    env.setdefault("MASTER_ADDR", first_host(env["SLURM_JOB_NODELIST"]))
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", 0)) % 20000))


def first_host(nodelist):
    """The first host of a SLURM node list: "gpu[07-09,12],cpu01" -> "gpu07"."""
    head = re.match(r"[^,\[]+(\[[^\]]*\])?", nodelist)[0]
    name, _, ranges = head.partition("[")
    return name + re.split(r"[-,\]]", ranges)[0] if ranges else name


def attempt_store():
    """torchrun's store under this attempt's prefix: a restarted worker must not reach the last attempt's ranks."""
    store, _, _ = next(dist.rendezvous("env://", timeout=DIST_TIMEOUT))
    return dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def run(command):
    """command(dd) in the distributed setup; the group destroyed after a good run only (NCCL waits for dead ranks)."""
    dd = setup_distributed()
    result = command(dd)
    if dd.world > 1:
        dist.destroy_process_group()
    return result


class UserError(Exception):
    """A run cannot go on for what its user gave or did: one line printed (cli.Cli), the same on every rank."""


def fail(message):
    raise UserError(message)


def first_line(e):
    """An exception's first line of text, or its type's name when it has none (IndexError(), EOFError())."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


@contextmanager
def together(dd):
    """A block any rank may stop with a UserError: every rank then raises the first rank's, so none waits alone."""
    error = None
    try:
        yield
    except UserError as e:
        error = str(e)
    error = next((e for e in gather(dd, error) if e), None)
    if error:
        fail(error)


def agree(dd, *flags):
    """Flags true on any rank -> true on every rank: a small all-reduce on the CPU group, no GPU sync."""
    t = torch.tensor([bool(f) for f in flags], dtype=torch.int32)
    if dd.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=dd.flags)
    return [bool(f) for f in t]


def gather(dd, value):
    """Every rank's `value`, in rank order (a pickled all-gather on the CPU group)."""
    if dd.world == 1:
        return [value]
    values = [None] * dd.world
    dist.all_gather_object(values, value, group=dd.flags)
    return values


# ---------------------------------------------------------------- files: checkpoints, lock, signals, record, log


def write_atomic(path, write):
    """write(this process's temporary), then rename to path: no half-written file, even from nodes sharing a cache."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        tmp.unlink(missing_ok=True)
        kept = f"{path.name} is unchanged" if path.exists() else "nothing was written"
        fail(f"could not write {path} ({first_line(e)}); {kept}")


def save_checkpoint(path, state):
    write_atomic(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path, mmap=False):
    """A checkpoint of ours, or any state dict, with weights_only=True; clear errors on bad files."""
    if not Path(path).is_file():
        fail(f"checkpoint {path} not found")
    if Path(path).stat().st_size == 0:
        fail(f"{path} is empty (0 bytes), not a checkpoint: a write cut short, e.g. by a full disk")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises several kinds for truncated or foreign files
        fail(f"{path} is not a readable checkpoint ({type(e).__name__}: {first_line(e)})")


@contextmanager
def out_dir_lock(out_dir, dd):
    """The out-dir, made and flock'ed by rank 0 for the run's life; flock ends with its process: no stale lock."""
    with together(dd):
        lock = take_lock(Path(out_dir)) if dd.main else None
    try:
        yield
    finally:
        if lock:
            lock.close()


def take_lock(out_dir):
    if out_dir.exists() and not out_dir.is_dir():
        fail(f"--out-dir {out_dir} is a file, not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = open(out_dir / ".lock", "a+")
    except OSError as e:
        fail(f"--out-dir {out_dir} cannot be created or written ({first_line(e)})")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        fail(f"--out-dir {out_dir} is in use by another run ({holder}, {out_dir / '.lock'}); "
             "wait for it to end, or pass another --out-dir")
    except OSError as e:  # a file system without flock (Lustre mounted without -o flock): run unlocked, and say so
        print(f"note: {out_dir} cannot be locked ({first_line(e)}); make sure no other run writes there")
    lock.truncate(0)
    print(f"pid {os.getpid()} on {socket.gethostname()}", file=lock, flush=True)
    return lock


@contextmanager
def stop_on_signals():
    """SIGINT, SIGTERM and SIGUSR1 (a scheduler's notice) append to the list yielded: the loop then checkpoints and
    stops. A second signal over 2 s later stops at once (torchrun forwards the terminal's own)."""
    received = []

    def note(signum, frame):
        if received and time.monotonic() - received[0][1] > 2:
            raise KeyboardInterrupt
        received.append((signal.Signals(signum).name, time.monotonic()))

    if threading.current_thread() is not threading.main_thread():  # handlers can be set in the main thread alone
        yield received
        return
    old = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield received
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def with_record(config, recipe, dd, eff_batch, lr):
    """The config plus world size and effective batch, checked on resume, and under "record" what ran it."""
    cuda = dd.device.type == "cuda"
    record = {"argv": [Path(sys.argv[0]).name, *sys.argv[1:]], **git_state(), "versions": versions(),
              "device": torch.cuda.get_device_name(dd.device) if cuda else f"CPU, {torch.get_num_threads()} threads",
              "devices": torch.cuda.device_count() if cuda else 1, "world_size": dd.world, "effective_batch": eff_batch,
              "lr": lr}
    return {**config, "recipe": {**config.get("recipe", {}), "world_size": dd.world, "effective_batch": eff_batch},
            "record": record}


def git_state():
    """The commit of the code that runs and whether its tree differs from it; None outside a git checkout."""
    try:
        git = partial(subprocess.run, cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
        commit, status = git(["git", "rev-parse", "HEAD"], check=True), git(["git", "status", "--porcelain"])
    except (OSError, subprocess.SubprocessError):  # not a git checkout, or no git
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def versions():
    """The installed versions of what a run's numbers depend on (None where a package is absent)."""
    found = {}
    for name in ("torch", "torchvision", "timm", "numpy"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def write_record(out_dir, config):
    """out_dir/run.json: the config as JSON a person reads without torch (timm's args.yaml), plus a list of starts."""
    path = Path(out_dir) / "run.json"
    starts = json.loads(path.read_text()).get("starts", []) if path.is_file() else []
    record = {**config, "starts": [*starts, {"time": time.strftime("%Y-%m-%d %H:%M:%S"), **config["record"]}]}
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(record, indent=1, default=str)))


class RunLog:
    """Rank 0's rows in log.jsonl, with tensorboard also as scalars (events from purge_step on, redone, hidden)."""

    def __init__(self, out_dir, tensorboard, purge_step):
        self.events = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional: imported for --tensorboard alone
            except ImportError:
                fail("--tensorboard needs the tensorboard package: pip install tensorboard")
            self.events = SummaryWriter(str(out_dir / "tensorboard"), purge_step=purge_step)
        self.file = open(out_dir / "log.jsonl", "a")

    def write(self, row):
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.events:
            for name, value in row.items():
                if name not in ("epoch", "step") and isinstance(value, (int, float)):
                    self.events.add_scalar(name, value, row["step"])
            self.events.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()
        if self.events:
            self.events.close()


# ---------------------------------------------------------------- resume

RESUMABLE = {  # the recipe settings a resume may change
    "epochs", "workers", "log_every", "save_every_min", "compile", "grad_ckpt", "resume_changed", "tensorboard"
}
DATA_DIR = "data_dir"  # where the data are: another location needs --resume-changed (the same data may have moved)


def flat(config, prefix=""):
    """A nested config as {"a.b": value} pairs."""
    out = {}
    for k, v in config.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_same_run(path, old_config, config):
    """Stops on a checkpoint of another model or data, or (without --resume-changed) recipe or data location."""
    old, new = flat(old_config), flat(config)
    changed = [  # record.*, what ran it (command, commit, versions), may differ in a rerun
        k for k in sorted(old.keys() | new.keys())
        if old.get(k) != new.get(k) and k.removeprefix("recipe.") not in RESUMABLE and not k.startswith("record.")
    ]
    described = [f"{k.removeprefix('recipe.')}: {old.get(k)} -> {new.get(k)}" for k in changed]
    run_changed = [d for k, d in zip(changed, described) if not k.startswith("recipe.") and k != DATA_DIR]
    if run_changed:
        fail(f"{path} holds a run of another model or data ({', '.join(run_changed[:4])}); "
             "pass a new --out-dir, or delete it to start over")
    if changed and not config.get("recipe", {}).get("resume_changed"):
        what = "data location" if changed == [DATA_DIR] else "recipe" + (" and data location" * (DATA_DIR in changed))
        fail(f"{path} was trained with another {what} ({', '.join(described)}); "
             "rerun with its flags, or add --resume-changed to continue with the new values")


def read_run_checkpoint(path, config):
    """The run's own checkpoint, checked: a file of ours, of this run."""
    ckpt = load_checkpoint(path)
    keys = ("model", "optimizer", "epoch", "epoch_step", "step", "steps_per_epoch", "config", "best", "metrics")
    missing = [k for k in keys if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        fail(f"{path} has no {', '.join(missing)}: not a checkpoint that a run of ours wrote; "
             "move it away to start over")
    check_same_run(path, ckpt["config"], config)
    return ckpt


def resume(out_dir, model, optimizer, config, dd, steps_per_epoch):
    """out_dir's checkpoint.pt into model and optimizer -> (epochs done, steps of the next, best, metrics)."""
    ckpt_path = out_dir / "checkpoint.pt"
    with together(dd):
        ckpt = read_run_checkpoint(ckpt_path, config) if ckpt_path.exists() else None
        best_path = out_dir / "checkpoint_best.pt"  # written first: a crash between the writes leaves it ahead
        if ckpt and best_path.is_file():
            ckpt["best"] = max(ckpt["best"], load_checkpoint(best_path, mmap=True)["best"])
    seen = gather(dd, ((ckpt["epoch"], ckpt["step"]) if ckpt else None, str(ckpt_path)))
    if seen[0][0] is None:
        if dd.main:  # the rows of an attempt killed before its first checkpoint are redone: they go
            truncate_log(out_dir / "log.jsonl", (0, 0, 0))
        return 0, 0, -math.inf, {}
    odd = next((r for r, (at, _) in enumerate(seen) if at != seen[0][0]), None)
    if odd is not None:
        (at, path), step = seen[odd], seen[0][0][1]
        sees = f"a checkpoint at step {at[1]}" if at else "no checkpoint"
        fail(f"rank {odd} sees {sees} at {path} where rank 0 resumes from step {step}: every process must see "
             "the same --out-dir; put it on a file system that all nodes share")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    # another batch or world size (--resume-changed) changes the steps per epoch: resume at the same share of it
    epoch_step = ckpt["epoch_step"] * steps_per_epoch // ckpt["steps_per_epoch"]
    with together(dd):
        if dd.main:
            truncate_log(out_dir / "log.jsonl", log_position(ckpt))
            part_way = f" and {ckpt['epoch_step']} steps of epoch {ckpt['epoch'] + 1}" if ckpt["epoch_step"] else ""
            print(f"resuming from {ckpt_path} after epoch {ckpt['epoch']}{part_way}")
    return ckpt["epoch"], epoch_step, ckpt["best"], ckpt["metrics"]


def log_position(row):
    """A log.jsonl row's or a checkpoint's place, (epoch, step, end): end is 1 for summary rows and epoch-end
    checkpoints, so a checkpoint at an epoch's last step keeps the epoch's steps but not its summary."""
    if "epoch_step" in row:  # a checkpoint: "epoch" counts epochs done
        return row["epoch"] + (1 if row["epoch_step"] else 0), row["step"], 0 if row["epoch_step"] else 1
    return row["epoch"], row["step"], int("epoch_s" in row)


def truncate_log(path, position):
    """Keep the log.jsonl rows up to position: the resumed run redoes the rest. A last line cut short by a kill goes."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            before = log_position(row) <= position
        except (json.JSONDecodeError, KeyError, TypeError):
            if n == len(lines):
                break
            fail(f"{path} line {n} is not a row of ours ({line[:40]!r}); delete that line and rerun")
        if before:
            kept.append(line)
    write_atomic(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))
