"""The engine: one training loop for every model here, and only the loop.

    distributed setup -> loaders -> optimizer and schedule -> resume -> compile and wrap -> epochs of
    train_one_epoch + evaluate -> atomic checkpoints and log.jsonl

A model is anything whose forward(x, y) returns (loss, metrics); the engine reads nothing else of it
but its parameters and state. What varies by model comes in as arguments of `fit`: the precision
context, the held-out evaluation, a callback at the start of each epoch. The commands (train.py, sleep1d.py,
detect.py) build the model and data and call `fit`.
"""
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, default_collate
from tqdm import tqdm

import data

# ---------------------------------------------------------------- setup


@dataclass(frozen=True)
class Dist:
    rank: int
    local_rank: int
    world: int
    device: torch.device

    @property
    def main(self):
        return self.rank == 0


def local_device():
    """This process's device when not launched by torchrun: the GPU if there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def setup_distributed():
    """Distributed when launched by torchrun (RANK in the environment), else one process."""
    if "RANK" not in os.environ:
        return Dist(0, 0, 1, local_device())
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, local_rank, world, device)


def autocast(device):
    """bf16 autocast on CUDA (no GradScaler needed), plain fp32 on CPU: the precision `fit` runs models in,
    unless their command passes another (detection: nullcontext, the detector switches precision itself)."""
    if device.type != "cuda":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16)


class RunError(Exception):
    """A run cannot go on (a missing checkpoint, a resume of another run, a loss gone non-finite): the CLIs
    print the message as one line, as they do part.ConfigError and data.DataError (cli.Cli)."""


def fail(message):
    raise RunError(message)


# ---------------------------------------------------------------- recipe, schedule, checkpoints


@dataclass
class Recipe:
    """Optimisation settings shared by every command; each is a CLI flag."""

    epochs: int = 100
    batch_size: int = 256  # per process
    accum: int = 1  # gradient accumulation steps
    blr: float = 1.25e-4  # base lr; lr = blr * effective batch / 256 (MAE). The paper: 5e-4 at batch 1024 (8.1)
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
    lr_drops: tuple = ()  # a step schedule: epochs where the lr drops x0.1, e.g. (8, 11) (Detectron's 1x of 12); (): cosine
    resume_changed: bool = False  # resume a run whose checkpoint has another recipe, with the new values


def lr_at(step, lr, warmup_steps, total_steps, min_lr, drop_steps=()):
    """Linear warmup, then cosine decay to min_lr, or x0.1 at each of drop_steps (a step schedule)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if drop_steps:
        return lr * 0.1 ** sum(step >= s for s in drop_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def encoder_name(name):
    """A parameter's name inside the ViT: after the last "encoder." (PART, classifiers, detect.py's backbone)."""
    return name.rpartition("encoder.")[2]


def layer_id(name, depth):
    """0 for embeddings and tokens, i+1 for blocks.i, depth+1 for everything after the blocks (BEiT)."""
    name = encoder_name(name)
    if name.startswith(("patch_embed", "cls_token", "pos_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups(model, weight_decay, layer_decay):
    """AdamW groups: no decay on norms, biases, tokens and position embeddings (ndim < 2),
    and, with layer_decay < 1, lr scaled by layer_decay ** (depth + 1 - layer)."""
    depth = 1 + max((int(encoder_name(n).split(".")[1]) for n, _ in model.named_parameters()
                     if encoder_name(n).startswith("blocks.")), default=-1)
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and not name.endswith(("cls_token", "pos_embed"))
        layer = layer_id(name, depth)
        key = (layer, decay)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": weight_decay if decay else 0.0, "lr_scale": layer_decay ** (depth + 1 - layer)}
        groups[key]["params"].append(p)
    return list(groups.values())


def write_atomic(path, write):
    """write(temporary path), then rename it to path: a crash never leaves a half-written file."""
    tmp = Path(str(path) + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(path, state):
    write_atomic(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path):
    """A checkpoint of ours, or any state dict, with weights_only=True; clear errors on bad files."""
    if not Path(path).is_file():
        fail(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several kinds for truncated or foreign files
        fail(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})")


# ---------------------------------------------------------------- the loop


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
    """Every process sees its own shard; order depends only on (seed, epoch), also in one process."""
    sampler = DistributedSampler(dataset, num_replicas=dd.world, rank=dd.rank, shuffle=train, seed=seed, drop_last=train)
    workers = (8 if dd.device.type == "cuda" else 0) if workers < 0 else workers
    if data.skips_bad_files(dataset):
        collate_fn = partial(data.skip_none_collate, collate=collate_fn or default_collate)
    if train and len(dataset) // dd.world < batch_size:
        fail(f"--batch-size {batch_size} is larger than the {len(dataset) // dd.world} training images per process")
    return DataLoader(dataset, batch_size, sampler=sampler, num_workers=workers, pin_memory=dd.device.type == "cuda",
                      drop_last=train, persistent_workers=workers > 0, collate_fn=collate_fn)


@torch.no_grad()
def evaluate(model, loader, dd, seed, precision=autocast):
    """Metrics averaged over a held-out set, weighted by batch size and reduced over processes.

    Runs under a fixed seed (the sampler and pairs of PART are random), so epochs compare
    like with like, and restores the training RNG after.
    """
    model.eval()
    sums, count = {}, torch.zeros((), device=dd.device)
    devices = [dd.device] if dd.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for batch in tqdm(loader, desc="eval", disable=not dd.main, leave=False):
            if batch is None:  # every file of the batch unreadable (--skip-bad-files)
                continue
            x, y = to_device(batch, dd.device)
            with precision(dd.device):
                _, metrics = model(x, y)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + v.float() * len(x)
            count += len(x)
    total = torch.stack([*sums.values(), count])
    if dd.world > 1:
        dist.all_reduce(total)
    model.train()
    return {k: (v / total[-1]).item() for k, v in zip(sums, total[:-1])}


def fit(model, train_set, val_set, recipe, out_dir, config, dd, best_key=None, evaluate_fn=None, collate_fn=None,
        train_collate_fn=None, precision=autocast, on_epoch=None):
    """Train `model` (forward(x, y) -> (loss, metrics)) and return the last held-out metrics.

    evaluate_fn(model, val_loader, dd, seed) -> {name: float} runs after every epoch (default:
    `evaluate`, the batch-weighted mean of the model's metrics). out_dir gets checkpoint.pt
    (every epoch), checkpoint_best.pt (when metric best_key improves, higher is better) and
    log.jsonl. A run finds its own checkpoint there and resumes. collate_fn batches both sets;
    train_collate_fn, when given, the training set alone (MixUp / CutMix). precision(device) is the
    context forward runs in; on_epoch(epoch, epochs), when given, is called before each epoch (0-based).
    """
    evaluate_fn = evaluate_fn or partial(evaluate, precision=precision)
    out_dir, ckpt_path = Path(out_dir), Path(out_dir) / "checkpoint.pt"
    train_loader = make_loader(train_set, recipe.batch_size, dd, recipe.seed, recipe.workers, True, train_collate_fn or collate_fn)
    val_loader = make_loader(val_set, recipe.batch_size, dd, recipe.seed, recipe.workers, False, collate_fn)
    steps_per_epoch, eff_batch, lr, schedule = lr_schedule(recipe, len(train_loader), dd.world)

    model.to(dd.device)
    optimizer = torch.optim.AdamW(param_groups(model, recipe.weight_decay, recipe.layer_decay), lr=lr, betas=(0.9, recipe.beta2))
    start_epoch, best, metrics = resume(ckpt_path, model, optimizer, config, dd)
    if start_epoch >= recipe.epochs:
        if dd.main:
            print(f"{ckpt_path} is a finished run of {start_epoch} epochs: nothing to train (raise --epochs to continue it)")
        return metrics
    if dd.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        print(f"batch {recipe.batch_size}/process x {dd.world} processes x {recipe.accum} accumulation = {eff_batch} effective; "
              f"base lr {recipe.blr:.3g} -> lr {lr:.3g}; {steps_per_epoch} steps/epoch, {recipe.epochs * steps_per_epoch} steps in all; "
              f"device {dd.device}")

    raw = model
    if recipe.compile:
        model = torch.compile(model)
    if dd.world > 1:
        model = DDP(model, device_ids=[dd.local_rank] if dd.device.type == "cuda" else None)
    log = open(out_dir / "log.jsonl", "a") if dd.main else None
    t_run = time.perf_counter()
    for epoch in range(start_epoch, recipe.epochs):
        torch.manual_seed(recipe.seed + 1000 * dd.rank + epoch)  # resume at an epoch replays the same randomness
        train_loader.sampler.set_epoch(epoch)
        t_epoch = time.perf_counter()
        if on_epoch:
            on_epoch(epoch, recipe.epochs)
        skipped = train_one_epoch(model, train_loader, optimizer, schedule, recipe, epoch, steps_per_epoch, dd, log, ckpt_path,
                                  precision)
        metrics = evaluate_fn(raw, val_loader, dd, recipe.seed)
        if dd.main:
            eta = (time.perf_counter() - t_run) / (epoch + 1 - start_epoch) * (recipe.epochs - epoch - 1)
            summary = {"epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch, "epoch_s": time.perf_counter() - t_epoch,
                       **({"skipped_files": skipped} if skipped else {}), **{f"val_{k}": v for k, v in metrics.items()}}
            report_epoch(summary, log, eta if epoch + 1 < recipe.epochs else None)
            improved = best_key is not None and metrics[best_key] > best
            best = metrics[best_key] if improved else best
            state = {"model": raw.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1, "step": summary["step"],
                     "config": config, "best": best, "metrics": metrics}
            save_checkpoint(ckpt_path, state)
            if improved:
                save_checkpoint(out_dir / "checkpoint_best.pt", state)
    if log:
        log.close()
    return metrics


def report_epoch(summary, log, eta_s=None):
    """An epoch's summary row (plus peak memory on CUDA) printed, with the time left, and appended to log.jsonl."""
    if torch.cuda.is_available():
        summary["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items())
          + (f"; about {eta_s / 60:.1f} min to go" if eta_s is not None else ""))
    log.write(json.dumps(summary) + "\n")
    log.flush()


def lr_schedule(recipe, batches, world):
    """-> optimizer steps per epoch, effective batch, peak lr (blr x effective batch / 256, MAE's rule),
    and the schedule: step -> lr."""
    steps_per_epoch = batches // recipe.accum
    if steps_per_epoch == 0:
        fail(f"--accum {recipe.accum} is more than the {batches} batches of an epoch")
    eff_batch = recipe.batch_size * recipe.accum * world
    lr = recipe.blr * eff_batch / 256
    schedule = partial(lr_at, lr=lr, warmup_steps=int(recipe.warmup_epochs * steps_per_epoch), total_steps=recipe.epochs * steps_per_epoch,
                       min_lr=recipe.min_lr, drop_steps=[int(e * steps_per_epoch) for e in recipe.lr_drops])
    return steps_per_epoch, eff_batch, lr, schedule


def train_one_epoch(model, loader, optimizer, schedule, recipe, epoch, steps_per_epoch, dd, log, ckpt_path, precision):
    """One pass over `loader`: forward, backward, and every `recipe.accum` micro-batches an optimizer
    step at lr schedule(step); a log.jsonl row every `recipe.log_every` steps; forward runs in precision(device).
    Returns the number of image files skipped as unreadable (the batches' shortfall, with
    --skip-bad-files), summed over processes."""
    model.train()
    micro_batches = steps_per_epoch * recipe.accum
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{recipe.epochs}", disable=not dd.main, leave=False, total=micro_batches)
    t_log = t0 = time.perf_counter()
    t_data, n_img, skipped = 0.0, 0, 0
    for i, batch in enumerate(bar):
        if i >= micro_batches:
            break
        if batch is None:  # every file of the batch unreadable (--skip-bad-files)
            skipped += recipe.batch_size
            continue
        x, y = to_device(batch, dd.device)
        skipped += recipe.batch_size - len(x)
        t_data += time.perf_counter() - t0
        step = epoch * steps_per_epoch + i // recipe.accum  # optimizer steps before this one
        last_micro = (i + 1) % recipe.accum == 0
        with nullcontext() if last_micro or dd.world == 1 else model.no_sync():  # DDP all-reduces on the last micro-batch only
            with precision(dd.device):
                loss, metrics = model(x, y)
            (loss / recipe.accum).backward()
        n_img += len(x) * dd.world
        if last_micro:
            step_lr = schedule(step)
            for g in optimizer.param_groups:
                g["lr"] = step_lr * g["lr_scale"]  # the lr_scale of layer decay
            if recipe.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if (step + 1) % recipe.log_every == 0:
                elapsed = time.perf_counter() - t_log
                row = {"epoch": epoch + 1, "step": step + 1, "lr": step_lr, **{k: v.item() for k, v in metrics.items()},
                       "img_per_s": n_img / elapsed, "data_share": t_data / elapsed}
                check_finite(row["loss"], step + 1, ckpt_path)
                if dd.main:
                    bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['img_per_s']:.0f}")
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                t_log, t_data, n_img = time.perf_counter(), 0.0, 0
        t0 = time.perf_counter()
    check_finite(loss.item(), step + 1, ckpt_path)
    if dd.world > 1:
        count = torch.tensor(skipped, device=dd.device)
        dist.all_reduce(count)
        skipped = int(count)
    return skipped


RESUMABLE = {"epochs", "workers", "log_every", "compile", "grad_ckpt", "resume_changed"}  # recipe fields a resume may change


def flat(config, prefix=""):
    """A nested config as {"a.b": value} pairs."""
    out = {}
    for k, v in config.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def resume(ckpt_path, model, optimizer, config, dd):
    """The run's own checkpoint into model and optimizer -> (epochs done, best metric, last metrics);
    (0, -inf, {}) without one. Stops when the checkpoint is of another model or data, or of another
    recipe unless --resume-changed; cuts log.jsonl back to the checkpoint's step."""
    if not ckpt_path.exists():
        return 0, -math.inf, {}
    ckpt = load_checkpoint(ckpt_path)
    old, new = flat(ckpt.get("config", {})), flat(config)
    changed = [k for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k) and k.removeprefix("recipe.") not in RESUMABLE]
    run_changed = [k for k in changed if not k.startswith("recipe.")]
    if run_changed:
        fail(f"{ckpt_path} holds a run of another model or data ({', '.join(f'{k}: {old.get(k)} -> {new.get(k)}' for k in run_changed[:4])}); "
             "pass a new --out-dir, or delete it to start over")
    if changed and not config.get("recipe", {}).get("resume_changed"):
        fail(f"{ckpt_path} was trained with another recipe ({', '.join(f'{k[7:]}: {old.get(k)} -> {new.get(k)}' for k in changed)}); "
             "rerun with its flags, or add --resume-changed to continue with the new values")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if dd.main:
        truncate_log(ckpt_path.parent / "log.jsonl", ckpt["step"])
        print(f"resuming from {ckpt_path} after epoch {ckpt['epoch']}")
    return ckpt["epoch"], ckpt.get("best", -math.inf), ckpt.get("metrics", {})


def truncate_log(path, step):
    """Keep the log.jsonl lines of steps up to `step`: an interrupted epoch's lines go, as its steps are redone."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in lines))


def check_finite(loss, step, ckpt_path):
    if not math.isfinite(loss):
        last = f"the last good checkpoint is {ckpt_path}" if ckpt_path.exists() else "no checkpoint was written yet"
        fail(f"loss is {loss} at step {step}; stopping ({last}). Try a lower --blr or --clip-grad 1.0")


def run(command):
    """Run a training command with distributed setup and teardown around it."""
    dd = setup_distributed()
    try:
        return command(dd)
    finally:
        if dd.world > 1:
            dist.destroy_process_group()
