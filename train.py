"""Training commands for PART, one loop for all of them.

    python train.py pretrain                          # PART on Fashion-MNIST, CPU-sized
    torchrun --nproc_per_node=8 train.py pretrain --data in1k --data-dir /data/imagenet --preset vit_b --patch-size 16
    python train.py bench --preset vit_b --img-size 224 --patch-size 16
    python train.py export --ckpt out/pretrain/checkpoint.pt --out part_encoder.pt
    python train.py show --ckpt out/pretrain/checkpoint.pt --image photo.jpg   # section 5.1's figures

Every model here returns (loss, metrics) from forward(x, y), so `fit` knows nothing
of the method: setup -> distributed -> data -> model -> optimizer -> resume ->
compile -> wrap -> loop. Checkpoints are written atomically at every epoch and a
run resumes from its output directory by itself.
"""
import itertools
import json
import math
import os
import resource
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import click
from PIL import Image, ImageOps
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, Subset, default_collate
from torch.utils.flop_counter import FlopCounterMode
from torchvision.transforms.v2.functional import pil_to_tensor
from tqdm import tqdm

import data
import part

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


def autocast(device, model=None):
    """bf16 autocast on CUDA (no GradScaler needed), plain fp32 on CPU; nothing for a model that switches
    precision itself (manages_precision: the detector, whose box decoding needs fp32)."""
    if device.type != "cuda" or getattr(getattr(model, "module", model), "manages_precision", False):  # DDP's .module
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16)


class RunError(Exception):
    """A run cannot go on (a missing checkpoint, a resume of another run, a loss gone non-finite): the CLIs
    print the message as one line, as they do part.ConfigError and data.DataError (`Cli`)."""


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
    clip_grad: float = 0.0  # max grad norm; 0 is off
    workers: int = -1  # data-loader workers per process; -1: 8 on CUDA, 0 on CPU
    seed: int = 0
    compile: bool = False
    grad_ckpt: bool = False  # activation checkpointing in the ViT blocks: less memory, ~1/3 more compute
    log_every: int = 50  # optimizer steps
    lr_drops: str = ""  # a step schedule: epochs where the lr drops x0.1, e.g. "8,11" (Detectron's 1x of 12); "": cosine
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
def evaluate(model, loader, dd, seed):
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
            with autocast(dd.device, model):
                _, metrics = model(x, y)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + v.float() * len(x)
            count += len(x)
    total = torch.stack([*sums.values(), count])
    if dd.world > 1:
        dist.all_reduce(total)
    model.train()
    return {k: (v / total[-1]).item() for k, v in zip(sums, total[:-1])}


def fit(model, train_set, val_set, recipe, out_dir, config, dd, best_key=None, evaluate_fn=evaluate, collate_fn=None,
        train_collate_fn=None):
    """Train `model` (forward(x, y) -> (loss, metrics)) and return the last held-out metrics.

    evaluate_fn(model, val_loader, dd, seed) -> {name: float} runs after every epoch (default:
    `evaluate`, the batch-weighted mean of the model's metrics). out_dir gets checkpoint.pt
    (every epoch), checkpoint_best.pt (when metric best_key improves, higher is better) and
    log.jsonl. A run finds its own checkpoint there and resumes. collate_fn batches both sets;
    train_collate_fn, when given, the training set alone (MixUp / CutMix).
    """
    out_dir, ckpt_path = Path(out_dir), Path(out_dir) / "checkpoint.pt"
    train_loader = make_loader(train_set, recipe.batch_size, dd, recipe.seed, recipe.workers, True, train_collate_fn or collate_fn)
    val_loader = make_loader(val_set, recipe.batch_size, dd, recipe.seed, recipe.workers, False, collate_fn)
    steps_per_epoch, eff_batch, lr, schedule = lr_schedule(recipe, len(train_loader), dd.world)

    model.to(dd.device)
    for m in model.modules():
        if isinstance(m, part.VisionTransformer):
            m.grad_checkpointing = recipe.grad_ckpt
    optimizer = torch.optim.AdamW(param_groups(model, recipe.weight_decay, recipe.layer_decay), lr=lr, betas=(0.9, 0.95))
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
        skipped = train_one_epoch(model, train_loader, optimizer, schedule, recipe, epoch, steps_per_epoch, dd, log, ckpt_path,
                                  getattr(raw, "set_progress", None))
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
                       min_lr=recipe.min_lr, drop_steps=drop_steps(recipe.lr_drops, steps_per_epoch))
    return steps_per_epoch, eff_batch, lr, schedule


def train_one_epoch(model, loader, optimizer, schedule, recipe, epoch, steps_per_epoch, dd, log, ckpt_path, set_progress=None):
    """One pass over `loader`: forward, backward, and every `recipe.accum` micro-batches an optimizer
    step at lr schedule(step); a log.jsonl row every `recipe.log_every` steps. set_progress, when the
    model has one (DropPos' decaying smoothing), hears the share of training done before each step.
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
        if set_progress:
            set_progress(step / (recipe.epochs * steps_per_epoch))
        with nullcontext() if last_micro or dd.world == 1 else model.no_sync():  # DDP all-reduces on the last micro-batch only
            with autocast(dd.device, model):
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


def drop_steps(lr_drops, steps_per_epoch):
    """--lr-drops "8,11" -> the optimizer steps where the lr drops x0.1."""
    try:
        return [int(float(e) * steps_per_epoch) for e in lr_drops.split(",") if e.strip()]
    except ValueError:
        fail(f"--lr-drops {lr_drops!r}: expected comma-separated epochs, e.g. 8,11")


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


# ---------------------------------------------------------------- CLI


class Cli(click.Group):
    """The commands of train.py, sleep1d.py and detect.py: our own errors (a bad setting, bad data, a run
    that cannot go on) stop them with one line instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (RunError, part.ConfigError, data.DataError) as e:
            # re-raised from a loader worker, the message ends with the original exception's own line
            message = str(e).strip().splitlines()[-1].removeprefix(f"{type(e).__module__}.{type(e).__name__}: ")
            raise click.ClickException(message) from None


def options(*decorators):
    """Apply click options so that --help lists them in the order given."""
    def apply(f):
        for decorate in reversed(decorators):
            f = decorate(f)
        return f
    return apply


POSITIVE, COUNT, NON_NEGATIVE = click.IntRange(min=1), click.IntRange(min=0), click.FloatRange(min=0)
OUT_DIR_HELP = "gets checkpoint.pt, log.jsonl (and checkpoint_best.pt); a run resumes from its own"
HEAD_HELP = "relative encoder (Table 5), each as the paper writes it; cross-attention-residual is not the paper's (README)"
RECIPE_FLAGS = {  # Recipe field: (click type, help)
    "epochs": (POSITIVE, "training epochs"),
    "batch_size": (POSITIVE, "images per process and step"),
    "accum": (POSITIVE, "gradient accumulation: micro-batches per optimizer step"),
    "blr": (click.FloatRange(min=0, min_open=True), "base learning rate: lr = blr x effective batch / 256 (printed at start)"),
    "min_lr": (NON_NEGATIVE, "the cosine schedule's last lr"),
    "warmup_epochs": (NON_NEGATIVE, "linear lr warmup, in epochs (fractions allowed)"),
    "weight_decay": (NON_NEGATIVE, "AdamW's, not on norms, biases, tokens and position embeddings"),
    "layer_decay": (click.FloatRange(min=0, max=1, min_open=True), "layer-wise lr decay: block i's lr x decay^(depth + 1 - i); 1: off"),
    "clip_grad": (NON_NEGATIVE, "max gradient norm; 0: no clipping"),
    "workers": (click.IntRange(min=-1), "data-loader workers per process; -1: 8 on CUDA, 0 on CPU"),
    "seed": (int, "seeds weights, sampling and data order: the same seed repeats a run"),
    "compile": (bool, "torch.compile the model"),
    "grad_ckpt": (bool, "activation checkpointing in the ViT blocks: less memory, ~1/3 more compute, same gradients"),
    "log_every": (POSITIVE, "optimizer steps between log.jsonl lines"),
    "lr_drops": (str, "a step schedule instead of cosine: epochs where the lr drops x0.1, e.g. 8,11"),
    "resume_changed": (bool, "resume the run in --out-dir with the recipe given now where it differs from its checkpoint's"),
}


def recipe_options(**defaults):
    """The Recipe's fields as click options, with per-command defaults, in the Recipe's order."""
    flags = []
    for name, default in {**asdict(Recipe()), **defaults}.items():
        kind, text = RECIPE_FLAGS[name]
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            flags.append(click.option(flag, is_flag=True, default=default, help=text))
        else:
            flags.append(click.option(flag, type=kind, default=default, show_default=True, help=text))
    return options(*flags)


def recipe_from(kwargs):
    return Recipe(**{k: kwargs.pop(k) for k in asdict(Recipe())})


@click.group(cls=Cli)
def cli():
    """PART: pretraining, finetuning and tools. See README.md."""


data_options = options(
    click.option("--data", "data_name", type=click.Choice(list(data.DATASETS)), default="fashion-mnist", show_default=True,
                 help="dataset; README lists the --data-dir layout of each"),
    click.option("--data-dir", default=None, help="dataset root; fashion-mnist falls back to Debian's package"),
    click.option("--img-size", type=POSITIVE, default=None, help="square side in pixels; default: the dataset's"),
    click.option("--in-chans", type=POSITIVE, default=None,
                 help="default: the dataset's; folders of images read 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA)"),
    click.option("--mean", type=float, multiple=True, help="input mean per channel, the flag repeated; default: the dataset's"),
    click.option("--std", type=float, multiple=True, help="input std per channel, as --mean"),
    click.option("--train-subset", type=COUNT, default=0, help="train on N random training images (drawn under --seed); 0: all"),
    click.option("--skip-bad-files", is_flag=True, help="skip and count unreadable image files instead of stopping at the first"),
)


DATA_FLAGS = ("data_name", "data_dir", "img_size", "in_chans", "mean", "std", "train_subset", "skip_bad_files")


def data_from(kwargs):
    """The data_options' values, taken out of a command's kwargs."""
    return {k: kwargs.pop(k) for k in DATA_FLAGS}


def load_sets(flags, train_transform, val_transform, seed=0):
    """Train and val sets of the data_options `flags`, with data.DataError turned into a clean CLI
    error; a train_subset > 0 keeps that many training images, the first of a permutation drawn under
    `seed`; with skip_bad_files, unreadable image files are skipped (and counted by `fit`)."""
    name = flags["data_name"]
    info = data.data_info(name, flags["img_size"], flags["in_chans"], flags["mean"], flags["std"])
    train_set = data.build_dataset(name, flags["data_dir"], "train", info, train_transform(info, name), flags["skip_bad_files"])
    val_set = data.build_dataset(name, flags["data_dir"], "val", info, val_transform(info, name), flags["skip_bad_files"])
    subset = flags["train_subset"]
    if subset > len(train_set):
        fail(f"--train-subset {subset} is more than the {len(train_set)} training images")
    if subset:
        keep = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed))[:subset]
        train_set = Subset(train_set, keep.tolist())
    return info, train_set, val_set


model_options = options(
    click.option("--preset", type=click.Choice(list(part.PRESETS)), default="vit_mini", show_default=True,
                 help="ViT width and depth; the paper: vit_s at 32 px, vit_b at 224 px"),
    click.option("--patch-size", type=POSITIVE, default=4, show_default=True, help="P; the paper: 4 at 32 px, 16 at 224 px"),
    click.option("--drop-path", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True, help="stochastic depth"),
)

SHARE = click.FloatRange(0, 1, max_open=True)


def method_options(pos_mask=0.0):
    """The pretraining method and its flags, one set for train.py and sleep1d.py (which differ in the
    default of --pos-mask); each flag names the methods it is for."""
    return options(
        click.option("--method", type=click.Choice(list(part.METHODS)), default="part", show_default=True,
                     help="part: the paper's; mae, droppos: the baselines of its Tables 1-3, on the same ViT"),
        click.option("--sampler", type=click.Choice(part.SAMPLERS), default="offgrid", show_default=True,
                     help="part: offgrid the paper's; offgrid-scale also dw, dh (5.1 ii); grid: PART-grid (Table 4)"),
        click.option("--head", type=click.Choice(part.HEADS), default="cross-attention", show_default=True, help="part: " + HEAD_HELP),
        click.option("--pos-mask", type=SHARE, default=pos_mask, show_default=True,
                     help="part: 0, no position information (section 4); >0: sin-cos positions for all but this share, "
                          "loss on pairs with a masked patch (README, the 1D readings)"),
        click.option("--mask-ratio", type=SHARE, default=0.75, show_default=True, help="mae, droppos: share of patches hidden from the encoder"),
        click.option("--pos-mask-ratio", type=SHARE, default=0.75, show_default=True,
                     help="droppos: share of the visible patches whose position embedding is dropped"),
        click.option("--decoder-dim", type=POSITIVE, default=128, show_default=True, help="mae, droppos: decoder width (the papers: 512)"),
        click.option("--decoder-depth", type=POSITIVE, default=2, show_default=True, help="mae, droppos: decoder blocks (MAE: 8, DropPos: 2)"),
        click.option("--sigma", type=NON_NEGATIVE, default=1.0, show_default=True,
                     help="droppos: position smoothing in patches at the start, decaying linearly to 0 (DropPos: 1)"),
    )


def pretext(method, vit, size, mean, std, **flags):
    """The config of `method`'s model on inputs of `size`, from the method_options (+ --num-patches, --pairs)."""
    return part.pretext_config(method, vit=vit, img_size=size, mean=mean, std=std, **flags)


@cli.command()
@data_options
@model_options
@method_options()
@click.option("--num-patches", type=COUNT, default=0, help="part: N; 0: (H/P)(W/P) as the paper")
@click.option("--pairs", "num_pairs", type=POSITIVE, default=128, show_default=True,
              help="part: K (ref, tgt) pairs per image; the paper sweeps 512-4096 at 64-196 patches (Figure 8)")
@recipe_options(epochs=3, batch_size=256, blr=1.5e-3, warmup_epochs=0.3, log_every=50)
@click.option("--out-dir", default="out/pretrain", show_default=True, help=OUT_DIR_HELP)
def pretrain(preset, patch_size, drop_path, method, out_dir, **kwargs):
    """Self-supervised pretraining: PART (section 4, relative positions of off-grid patches), or MAE or
    DropPos on the same ViT, data and loop."""
    recipe, flags = recipe_from(kwargs), data_from(kwargs)
    info, train_set, val_set = load_sets(flags, data.pretrain_transform, data.eval_transform, recipe.seed)
    vit = part.vit_config(preset, patch_size=patch_size, in_chans=info.in_chans, drop_path=drop_path)
    cfg = pretext(method, vit, (info.img_size, info.img_size), info.mean, info.std, **kwargs)

    def command(dd):
        torch.manual_seed(recipe.seed)  # the same initial weights on every process
        model = part.pretext_model(method, cfg)
        config = {"kind": method, "data": flags["data_name"], "train_subset": flags["train_subset"], "model": cfg.to_dict(),
                  "recipe": asdict(recipe)}
        fit(model, train_set, val_set, recipe, out_dir, config, dd)

    run(command)


# ---------------------------------------------------------------- finetuning and linear probing

DEFAULT_INIT = "out/pretrain/checkpoint.pt"  # where `pretrain` writes by default


KINDS = {  # what a checkpoint's config "kind" says it is
    **{m: f"a {model.__name__} 2D pretraining checkpoint (train.py pretrain --method {m})" for m, (_, model) in part.METHODS.items()},
    **{f"{m}1d": f"a {model.__name__} 1D pretraining checkpoint (sleep1d.py pretrain --method {m})" for m, (_, model) in part.METHODS.items()},
    "classifier": "an image classifier (train.py finetune)",
    "sleep-stager": "a sleep stager (sleep1d.py finetune)",
    "detect": "a detector (detect.py)",
    "encoder": "an exported encoder (train.py export)",
}
ENCODER_KINDS = {  # starting weights, by patch_ndim
    2: (*part.METHODS, "classifier", "encoder"),
    1: (*(f"{m}1d" for m in part.METHODS), "sleep-stager", "encoder"),
}


def read_config(path, ckpt):
    """A checkpoint's config: its own, or for an exported encoder the JSON that train.py export writes
    beside it; {} for a foreign state dict."""
    beside = Path(path).with_suffix(".json")
    if beside.is_file():
        try:
            return json.loads(beside.read_text())
        except json.JSONDecodeError as e:
            fail(f"{beside} is not the JSON that train.py export writes ({e})")
    config = ckpt.get("config") if isinstance(ckpt, dict) else None
    return config if isinstance(config, dict) else {}


def pretrained_encoder(path, patch_ndim=2):
    """(encoder weights in timm names, the checkpoint's config, {} for a foreign state dict) from any
    checkpoint layout; stops with one line when the file is missing or of a kind that does not hold
    a `patch_ndim`-D encoder to start from."""
    if not Path(path).is_file():
        fail(f"{path} not found: finetuning starts from a PART checkpoint; run `python {'train.py' if patch_ndim == 2 else 'sleep1d.py'} "
             "pretrain` first, or pass --init PATH, or --init scratch for the supervised baseline")
    ckpt = load_checkpoint(path)
    config = read_config(path, ckpt)
    kind, ndim = config.get("kind"), config.get("model", {}).get("vit", {}).get("patch_ndim", patch_ndim)
    if kind and (kind not in ENCODER_KINDS[patch_ndim] or ndim != patch_ndim):
        expected = " or ".join(KINDS[k] for k in ENCODER_KINDS[patch_ndim])
        got = KINDS.get(kind, f"a checkpoint of kind {kind!r}") + (f" of a {ndim}D ViT" if ndim != patch_ndim else "")
        fail(f"{path} is {got}; this command starts from {expected} of a {patch_ndim}D ViT")
    return part.encoder_state_dict(ckpt), config


def encoder_from_init(init, fallback, patch_ndim=2):
    """--init -> (the encoder's ViTConfig, its weights or None, the checkpoint's config), for finetune,
    detect.py and sleep1d.py alike: `scratch` is `fallback` without weights; a checkpoint or export of
    ours brings its own ViT; a foreign state dict takes `fallback` with its patch embedding's channels."""
    if init == "scratch":
        return fallback, None, {}
    state, config = pretrained_encoder(init, patch_ndim)
    vit = config.get("model", {}).get("vit")
    if vit:
        return part.ViTConfig(**vit), state, config
    if "patch_embed.proj.weight" not in state:
        fail(f"{init} is neither a checkpoint of ours nor an encoder state dict (it has no patch_embed.proj.weight)")
    return replace(fallback, in_chans=state["patch_embed.proj.weight"].shape[1]), state, config


def default_pool(state, linear_probe):
    """The class token (the paper's), except for a probe of weights whose class token was never
    trained (PART pretrains without one): a frozen random token would be probed, so average the patches."""
    return "avg" if linear_probe and (state is None or "cls_token" not in state) else "cls"


def count_classes(name, info, train_set):
    base = train_set
    while hasattr(base, "dataset"):  # under Subset (--train-subset) and SkipBadFiles
        base = base.dataset
    classes = info.num_classes or len(getattr(base, "classes", ()))  # imagefolder counts its class folders
    if not classes:
        fail(f"--data {name} has no labels; finetuning needs fashion-mnist, cifar10, cifar100, in1k or imagefolder")
    return classes


def classifier_config(info, classes, base, pretrained, preset, patch_size, drop_path, pool, linear_probe, smoothing, pos_pretrained=False):
    """The ViT of --init (`base`, from encoder_from_init) unless --preset / --patch-size say otherwise; with
    `pretrained` weights they must then agree with it. pos_pretrained: the weights bring position embeddings."""
    vit = replace(base, **(part.PRESETS[preset] if preset else {}), patch_size=patch_size or base.patch_size, in_chans=info.in_chans,
                  drop_path=0.0 if linear_probe else drop_path)
    size = ("embed_dim", "depth", "num_heads", "patch_size", "in_chans")
    if pretrained and any(getattr(vit, k) != getattr(base, k) for k in size):
        fail(f"the checkpoint is of another size than asked: its ViT has {', '.join(f'{k} {getattr(base, k)}' for k in size)}; "
             f"--preset / --patch-size / the data ask for {', '.join(f'{k} {getattr(vit, k)}' for k in size)}")
    return part.ClassifierConfig(vit=vit, img_size=(info.img_size, info.img_size), num_classes=classes, pool=pool,
                                 linear_probe=linear_probe, smoothing=smoothing, mean=info.mean, std=info.std, pos_pretrained=pos_pretrained)


def source_grid(source):
    """The token grid a checkpoint's position embedding covers, from its model config: a finetuned
    model's pos_grid, else the on-grid patches of its inputs (MAE's, DropPos' fixed embeddings)."""
    vit = source["vit"]
    return tuple(vit.get("pos_grid") or (s // vit["patch_size"] for s in source["img_size"]))


def load_pretrained(encoder, state, source, path, main):
    """A checkpoint's encoder weights into `encoder`, the ViT of a classifier, sleep stager or detector;
    prints which it kept, interpolated or started fresh. A position embedding in the checkpoint (a
    finetuned model's, or the fixed sin-cos one of MAE, DropPos or PART with --pos-mask) is resized to
    the new grid and kept; PART pretrains without one, so its new one starts fresh, as the paper's."""
    state, note = dict(state), ""
    if "pos_embed" in state and encoder.pos_embed is not None and source.get("vit"):
        state["pos_embed"], note = part.adapt_pos_embed(state["pos_embed"], source_grid(source), encoder)
    fresh, unexpected = part.load_encoder(encoder, state, path)
    if main:
        print(f"encoder from {path}; {note + '; ' if note else ''}new: {', '.join(fresh) or 'none'}; ignored: {', '.join(unexpected) or 'none'}")


@cli.command()
@data_options
@click.option("--init", default=DEFAULT_INIT, show_default=True,
              help="a PART checkpoint (training dict, {'model'}, {'state_dict'} or bare; module.-prefixed or not), or 'scratch'")
@click.option("--linear-probe", is_flag=True, help="freeze the encoder; train BatchNorm without affine + a linear head (MAE)")
@click.option("--preset", type=click.Choice(list(part.PRESETS)), default=None, help="default: the checkpoint's; vit_mini from scratch")
@click.option("--patch-size", type=POSITIVE, default=None, help="default: the checkpoint's; 4 from scratch")
@click.option("--pool", type=click.Choice(part.POOLS), default=None,
              help="the paper: cls; default cls, but avg for a probe of weights without a trained class token (PART's)")
@click.option("--drop-path", type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True, help="DeiT: 0.1; 0 with --linear-probe")
@click.option("--smoothing", type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True, help="label smoothing; DeiT: 0.1")
@click.option("--randaug-n", type=COUNT, default=2, show_default=True, help="RandAugment ops per image, 0: off; DeiT: 2")
@click.option("--randaug-m", type=click.IntRange(0, 30), default=9, show_default=True, help="RandAugment magnitude; DeiT: 9")
@click.option("--mixup", type=NON_NEGATIVE, default=0.0, show_default=True, help="MixUp alpha, 0: off; DeiT: 0.8 (for 300 epochs)")
@click.option("--cutmix", type=NON_NEGATIVE, default=0.0, show_default=True, help="CutMix alpha, 0: off; DeiT: 1.0 (for 300 epochs)")
@click.option("--reprob", type=click.FloatRange(0, 1), default=0.25, show_default=True, help="RandomErasing probability; DeiT: 0.25")
@recipe_options(epochs=5, batch_size=128, blr=1e-3, warmup_epochs=1.0, log_every=50)
@click.option("--out-dir", default="out/finetune", show_default=True, help=OUT_DIR_HELP)
def finetune(init, linear_probe, preset, patch_size, pool, drop_path, smoothing, randaug_n, randaug_m, mixup, cutmix, reprob, out_dir,
             **kwargs):
    """Finetune a PART encoder as the paper does (section 4 "Training setup": class token, new
    position embeddings, linear head; DeiT's recipe), or linear-probe it. --init scratch trains the
    same ViT from random weights with the same recipe. As the paper (DeiT), no layer decay unless
    --layer-decay is given, and then for either init alike."""
    recipe, flags = recipe_from(kwargs), data_from(kwargs)
    base, state, source = encoder_from_init(init, part.vit_config("vit_mini", patch_size=4))
    pool = pool or default_pool(state, linear_probe)
    augment = partial(data.finetune_transform, randaug_n=randaug_n, randaug_m=randaug_m, reprob=reprob)
    info, train_set, val_set = load_sets(flags, augment, data.eval_transform, recipe.seed)
    cfg = classifier_config(info, count_classes(flags["data_name"], info, train_set), base, state is not None, preset, patch_size, drop_path,
                            pool, linear_probe, smoothing, pos_pretrained=state is not None and "pos_embed" in state)

    def command(dd):
        torch.manual_seed(recipe.seed)  # the same new weights on every process
        model = part.Classifier(cfg)
        if state is not None:
            load_pretrained(model.encoder, state, source.get("model", {}), init, dd.main)
        augmentation = {"randaug_n": randaug_n, "randaug_m": randaug_m, "mixup": mixup, "cutmix": cutmix, "reprob": reprob}
        config = {"kind": "classifier", "data": flags["data_name"], "train_subset": flags["train_subset"], "init": init,
                  "model": cfg.to_dict(),
                  "recipe": {**asdict(recipe), **augmentation}}
        fit(model, train_set, val_set, recipe, out_dir, config, dd, best_key="acc",
            train_collate_fn=data.mix_collate(mixup, cutmix, cfg.num_classes))

    run(command)


PEAK_BF16_FLOPS = {"H100 SXM": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, vendor sheets


def timed(fns, steps, device):
    """Median seconds per call of each of fns, called in turn (so that a change of machine load
    hits all alike), after two warm-up rounds."""
    times = [[] for _ in fns]
    for i in range(steps + 2):
        for fn, spent in zip(fns, times):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                spent.append(time.perf_counter() - t)
    return [sorted(spent)[len(spent) // 2] for spent in times]


def peak_memory_gib(device):
    """Peak memory so far: CUDA's allocated tensors, or this process's resident set on CPU (Linux, kB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@cli.command()
@click.option("--preset", type=click.Choice(list(part.PRESETS)), default="vit_mini", show_default=True, help="ViT width and depth")
@click.option("--img-size", type=POSITIVE, default=28, show_default=True, help="square side of the random images")
@click.option("--patch-size", type=POSITIVE, default=4, show_default=True, help="P")
@click.option("--in-chans", type=POSITIVE, default=1, show_default=True, help="image channels")
@click.option("--batch-size", type=POSITIVE, default=256, show_default=True, help="images per step")
@click.option("--num-patches", type=COUNT, multiple=True, default=(0,), show_default=True,
              help="N (repeatable, for a sweep); 0: (H/P)(W/P) as the paper")
@click.option("--pairs", type=POSITIVE, multiple=True, default=(128,), show_default=True, help="K (repeatable, for a sweep)")
@click.option("--sampler", type=click.Choice(part.SAMPLERS), default="offgrid", show_default=True, help="as pretrain's")
@click.option("--head", type=click.Choice(part.HEADS), default="cross-attention", show_default=True, help=HEAD_HELP)
@click.option("--steps", type=POSITIVE, default=10, show_default=True, help="timed steps per configuration")
@click.option("--compile", "use_compile", is_flag=True, help="time the PART step under torch.compile")
@click.option("--methods", is_flag=True, help="also time an MAE and a DropPos step (defaults) beside PART's, interleaved")
def bench(preset, img_size, patch_size, in_chans, batch_size, num_patches, pairs, sampler, head, steps, use_compile, methods):
    """Time a PART pretraining step beside a bare ViT step on this device: images/s, their ratio,
    the sampler's share, GFLOP, peak memory and MFU on CUDA; a sweep over N and K with repeated flags."""
    device = local_device()
    vit = part.vit_config(preset, patch_size=patch_size, in_chans=in_chans)
    stats = (0.5,) * in_chans, (0.25,) * in_chans
    print(f"{preset}/{patch_size} at {img_size}px, batch {batch_size}, {head}, {sampler}, on {describe(device)}; "
          "PART: sampler + ViT + head + loss; bare ViT: the same ViT on the same patches, no sampler, no head")
    for n, k in itertools.product(num_patches, pairs):
        cfg = pretext("part", vit, (img_size, img_size), *stats, sampler=sampler, num_patches=n, num_pairs=k, head=head)
        bench_one(cfg, batch_size, steps, use_compile, device)
    if methods:
        bench_methods(vit, (img_size, img_size), stats, batch_size, steps, device, sampler=sampler, num_pairs=pairs[0], head=head)


def bench_methods(vit, size, stats, batch_size, steps, device, **part_flags):
    """A pretraining step of each method (the default flags, PART's as given) on the same ViT and images,
    timed in turn: ms per step, the ratio to PART's, and GFLOP per image."""
    images = torch.randint(0, 256, (batch_size, vit.in_chans, *size), dtype=torch.uint8, device=device)
    steps_of = {}
    for method in part.METHODS:
        torch.manual_seed(0)
        model = part.pretext_model(method, pretext(method, vit, size, *stats, **part_flags)).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, optimizer=optimizer):
            with autocast(device, model):
                loss, _ = model(images)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps_of[method] = step
    times = dict(zip(steps_of, timed(list(steps_of.values()), steps, device)))
    for method, step in steps_of.items():
        print(f"{method:8s} step {times[method] * 1e3:8.1f} ms = {batch_size / times[method]:7.1f} img/s, "
              f"{times[method] / times['part']:.2f} x PART's; GFLOP/img (fwd+bwd) {count_flops(step) / batch_size / 1e9:.3g}")


def bench_one(cfg, batch_size, steps, use_compile, device):
    """One line of `bench`: the PART step and the bare ViT step of config cfg, timed side by side."""
    torch.manual_seed(0)
    model = part.PART(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    H, W = cfg.img_size
    images = torch.randint(0, 256, (batch_size, cfg.vit.in_chans, H, W), dtype=torch.uint8, device=device)
    forward = torch.compile(model) if use_compile else model
    patches, _ = model.sample(images)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def optimise(loss):
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def step():  # the whole PART step
        with autocast(device):
            loss, _ = forward(images)
        optimise(loss)

    def vit_step():  # the bare ViT: the same patches through the encoder, a stand-in loss
        with autocast(device):
            loss = model.encoder.forward_features(patches).float().square().mean()
        optimise(loss)

    t_step, t_vit, t_sample = timed([step, vit_step, lambda: model.sample(images)], steps, device)
    flops, vit_flops = (count_flops(fn) / batch_size / 1e9 for fn in (step, vit_step))  # per image
    line = (f"N {cfg.num_patches:4d}, K {cfg.num_pairs:5d}: PART step {t_step * 1e3:8.1f} ms = {batch_size / t_step:7.1f} img/s, "
            f"bare ViT {t_vit * 1e3:8.1f} ms, ratio {t_step / t_vit:.3f}; sampler {t_sample / t_step:.1%}; "
            f"GFLOP/img (fwd+bwd) {flops:.2f} vs {vit_flops:.2f}; peak memory {peak_memory_gib(device):.2f} GiB")
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in describe(device)), None)
    print(line + (f"; MFU {flops * 1e9 * batch_size / t_step / peak:.1%} of {peak / 1e12:.0f} TFLOP/s bf16" if peak else ""))


def count_flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def describe(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


EXPORTABLE = (*ENCODER_KINDS[2][:-1], *ENCODER_KINDS[1][:-1])  # every checkpoint that holds an encoder, but an export


@cli.command()
@click.option("--ckpt", required=True, help="a checkpoint of train.py pretrain / finetune or sleep1d.py pretrain / finetune")
@click.option("--out-dir", default="out/export", show_default=True, help="gets encoder.pt (timm's names) and encoder.json (its config)")
def export(ckpt, out_dir):
    """Write the encoder's weights alone, loadable into timm's VisionTransformer, and its config beside
    them, so that `--init OUT_DIR/encoder.pt` needs no other flag (README)."""
    checkpoint = load_checkpoint(ckpt)
    config = read_config(ckpt, checkpoint)
    kind = config.get("kind")
    if kind not in EXPORTABLE or "model" not in checkpoint:
        got = KINDS.get(kind, "not a checkpoint of this project (its config names no kind)")
        fail(f"{ckpt} is {got}; export takes " + " or ".join(KINDS[k] for k in EXPORTABLE))
    state = part.encoder_state_dict(checkpoint)
    model = config["model"]
    meta = {"kind": "encoder", "source": str(ckpt), "source_kind": kind, "data": config.get("data"),
            "model": {k: model[k] for k in ("vit", "img_size", "mean", "std") if k in model}}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / "encoder.pt", state)
    write_atomic(out / "encoder.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))
    print(f"wrote {len(state)} tensors to {out / 'encoder.pt'} and their config to {out / 'encoder.json'}")


# ---------------------------------------------------------------- show: what PART learned (section 5.1)


def load_part(path):
    """The PART model of a pretraining checkpoint, in eval mode, and the run's config."""
    ckpt = load_checkpoint(path)
    config = ckpt.get("config") if isinstance(ckpt, dict) else None
    if not isinstance(config, dict) or config.get("kind") != "part" or "model" not in ckpt:
        fail(f"{path} is not a PART pretraining checkpoint: expected the checkpoint.pt of `train.py pretrain`, with config kind 'part'")
    try:
        model = part.PART(part.PARTConfig(**config["model"]))
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        fail(f"{path}: its weights do not fit its own model config ({str(e).splitlines()[0]})")
    return model.eval(), config


def read_image(path, chans, size):
    """An image file as uint8 (C, H, W): converted to `chans` channels, centre-cropped to the
    aspect ratio of size = (H, W) and resized to it."""
    if chans not in (1, 3):
        fail(f"--image needs a 1- or 3-channel checkpoint, this one takes {chans} channels")
    img = data.read_image_file(path, "L" if chans == 1 else "RGB")
    return pil_to_tensor(ImageOps.fit(img, (size[1], size[0]), Image.Resampling.BICUBIC))


def held_out_images(config, cfg, data_dir, indices):
    """[(name, uint8 (C, H, W))] from the validation split of the checkpoint's dataset."""
    name = config.get("data")
    if not name:
        fail("the checkpoint records no dataset: pass --image")
    try:
        info = data.data_info(name, cfg.img_size[0], cfg.vit.in_chans)
        val_set = data.build_dataset(name, data_dir, "val", info, data.eval_transform(info, name))
    except data.DataError as e:
        fail(f"{e} (or pass --image)")
    for i in indices:
        if not 0 <= i < len(val_set):
            fail(f"--index {i} is outside the {len(val_set)} held-out images of {name}")
    return [(f"{name}_val{i}", val_set[i][0]) for i in indices]


@cli.command()
@click.option("--ckpt", required=True, help="a PART pretraining checkpoint (out/pretrain/checkpoint.pt)")
@click.option("--image", "image_paths", multiple=True, help="an image file (repeatable); default: held-out images of the checkpoint's dataset")
@click.option("--index", "indices", type=COUNT, multiple=True, default=(0,), show_default=True, help="held-out image(s) shown without --image")
@click.option("--data-dir", default=None, help="the checkpoint's dataset, for held-out images (fashion-mnist falls back to Debian's package)")
@click.option("--ref", type=int, default=-1, help="reference patch of Figure 4; -1: the one nearest the image centre")
@click.option("--target", type=int, default=-1, help="target patch of Figure 5; -1: the most and the least certain")
@click.option("--seed", type=int, default=0, show_default=True, help="seeds the patch sampler and the shuffled order")
@click.option("--out-dir", default="out/show", show_default=True, help="gets the figures and their numbers")
def show(ckpt, image_paths, indices, data_dir, ref, target, seed, out_dir):
    """What PART learned (section 5.1): off-grid reconstruction, patch uncertainty, negative symmetry."""
    model, config = load_part(ckpt)
    cfg = model.cfg
    if image_paths:
        images = [(Path(p).stem, read_image(p, cfg.vit.in_chans, cfg.img_size)) for p in image_paths]
    else:
        images = held_out_images(config, cfg, data_dir, indices)
    import figures  # matplotlib: loaded by this command alone

    for name, image in images:
        figures.show_image(model, name, image, ref, target, seed, Path(out_dir))


def knn_predict(bank, bank_labels, queries, k=20, temperature=0.07, chunk=1024):
    """DINO's weighted k-nearest-neighbour classifier on L2-normalised features: each of a query's
    k most cosine-similar bank features votes for its class with weight exp(similarity / temperature).
    bank (M, D), bank_labels (M,), queries (Q, D) -> predicted classes (Q,)."""
    classes = int(bank_labels.max()) + 1
    preds = []
    for q in queries.split(chunk):
        sim, idx = (q @ bank.T).topk(k, dim=1)  # (q, k) the nearest neighbours
        votes = torch.zeros(len(q), classes, device=q.device).scatter_add_(1, bank_labels[idx], (sim / temperature).exp())
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


@torch.no_grad()
def knn_features(encoder, mean, std, pool, dataset, dd, batch_size=512):
    """A frozen encoder's features of the on-grid patches, as its checkpoint was trained (position
    embeddings if it has them): the class token (pool "cls") or the mean of the patch tokens ("avg"),
    L2-normalised, on dd.device -> (n, D), labels (n,)."""
    feats, labels = [], []
    normalize = part.Normalize(mean, std).to(dd.device)
    prefix = int(encoder.cls_token is not None)
    for images, y in tqdm(make_loader(dataset, batch_size, dd, 0, -1, False), desc="features", leave=False):
        patches = part.patchify(normalize(images.to(dd.device, non_blocking=True)), encoder.cfg.patch_size)
        with autocast(dd.device):
            tokens = encoder.forward_features(patches)  # (B, T, D)
        pooled = tokens[:, 0] if pool == "cls" else tokens[:, prefix:].mean(dim=1)  # (B, D)
        feats.append(F.normalize(pooled.float(), dim=-1))
        labels.append(y.to(dd.device))
    return torch.cat(feats), torch.cat(labels)


def frozen_encoder(path, random_init):
    """The 2D encoder of a checkpoint or export, its model config and data name, in eval mode, with the
    position embeddings it was trained with (a finetuned model's, or the fixed ones of MAE, DropPos and
    PART --pos-mask); with random_init its architecture with fresh weights and no positions, the baseline."""
    state, config = pretrained_encoder(path)
    model = config.get("model", {})
    if "vit" not in model or "img_size" not in model:
        fail(f"{path} carries no model config: knn takes our checkpoints and exports (train.py export writes the config beside)")
    vit = replace(part.ViTConfig(**model["vit"]), num_classes=0)
    if random_init:
        return part.VisionTransformer(vit).eval(), model, config.get("data")
    encoder = part.VisionTransformer(replace(vit, pos_grid=source_grid(model)) if "pos_embed" in state else vit)
    load_pretrained(encoder, state, model, path, main=False)
    return encoder.eval(), model, config.get("data")


@cli.command()
@click.option("--ckpt", default=DEFAULT_INIT, show_default=True, help="a PART checkpoint, a finetuned classifier or an export of either")
@click.option("--data-dir", default=None, help="the checkpoint's dataset (fashion-mnist falls back to Debian's package)")
@click.option("--pool", type=click.Choice(part.POOLS), default="avg", show_default=True,
              help="avg: the patch tokens' mean (PART trains no class token); cls: a finetuned model's class token")
@click.option("--k", type=POSITIVE, default=20, show_default=True, help="neighbours (DINO: 20)")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=0.07, show_default=True, help="a vote weighs exp(cosine / T) (DINO: 0.07)")
@click.option("--random-init", is_flag=True, help="the checkpoint's encoder with fresh random weights: the baseline")
def knn(ckpt, data_dir, pool, k, temperature, random_init):
    """Weighted kNN top-1 (DINO) of the frozen encoder's features: training images vote for held-out ones."""
    torch.manual_seed(0)  # the random baseline's weights
    encoder, model, name = frozen_encoder(ckpt, random_init)
    if pool == "cls" and encoder.cls_token is None:
        fail(f"--pool cls: {ckpt} has no class token (PART pretrains without one); use --pool avg")
    if not name:
        fail(f"{ckpt} records no dataset")
    flags = {"data_name": name, "data_dir": data_dir, "img_size": model["img_size"][0], "in_chans": encoder.cfg.in_chans,
             "mean": model["mean"], "std": model["std"], "train_subset": 0, "skip_bad_files": False}
    info, train_set, val_set = load_sets(flags, data.eval_transform, data.eval_transform)
    count_classes(name, info, train_set)  # stops on unlabelled data
    if k > len(train_set):
        fail(f"--k {k}: expected 1 to the {len(train_set)} training images")
    dd = Dist(0, 0, 1, local_device())  # one process, even under torchrun
    encoder.to(dd.device)
    bank, bank_labels = knn_features(encoder, model["mean"], model["std"], pool, train_set, dd)
    queries, labels = knn_features(encoder, model["mean"], model["std"], pool, val_set, dd)
    acc = (knn_predict(bank, bank_labels, queries, k, temperature) == labels).float().mean().item()
    print(f"kNN top-1 {acc:.4f}: {len(val_set)} held-out {name} images, {len(train_set)} training images vote, "
          f"k {k}, T {temperature}, pool {pool}, {'random' if random_init else 'pretrained'} encoder of {ckpt}")


if __name__ == "__main__":
    cli()
