"""The engine: one training loop for every model here, and only the loop.

    distributed setup -> loaders -> optimizer and schedule -> lock the out-dir -> resume -> wrap (DDP, then
    compile) -> epochs of train_one_epoch + evaluate -> atomic checkpoints and log.jsonl

A model is anything whose forward(x, y) returns (loss, metrics); the engine reads nothing else of it
but its parameters and state. What varies by model comes in as arguments of `fit`: the precision
context, the held-out evaluation, a callback at the start of each epoch. The commands (train.py, sleep1d.py,
detect.py) build the model and data and call `fit`.

What a run survives (README, "What is safe"): a kill at any moment (checkpoints are written to a
temporary and renamed, the best one before the last); SIGINT / SIGTERM (a checkpoint at the current
step, and a rerun continues from that step, bit-exact on CPU); a full disk (the last good checkpoint
stays); a second run on the same out-dir (a lock); a rank that stops (every rank stops with the same line).
"""

import fcntl
import hashlib
import importlib.metadata
import itertools
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate
from tqdm import tqdm

import data

# ---------------------------------------------------------------- setup

# every collective's limit, set here alone: rank 0 evaluates alone (detect.py's COCOeval) and writes checkpoints
# while the other ranks wait in the next collective, which torch's default of 10 minutes cut short
DIST_TIMEOUT = timedelta(minutes=60)


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
    """Distributed when launched by torchrun (RANK in the environment), else one process. On CUDA, fp32
    matmuls (detection's heads) run in TF32, and rank r takes GPU LOCAL_RANK modulo the visible GPUs:
    launchers that show each task one GPU (SLURM) give every rank cuda:0."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if "RANK" not in os.environ:
        return Dist(0, 0, 1, local_device())
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=attempt_store(), rank=rank, world_size=world, timeout=DIST_TIMEOUT)
    flags = dist.new_group(backend="gloo", timeout=DIST_TIMEOUT) if backend == "nccl" else None
    return Dist(rank, local_rank, world, device, flags)


def attempt_store():
    """torchrun's rendezvous store, its keys under a prefix of this attempt: workers that `torchrun --max-restarts`
    starts again must not read the keys the last attempt's workers left (gloo and NCCL exchange their addresses
    there), or a rank that arrives early connects to a dead one."""
    store, _, _ = next(dist.rendezvous("env://", timeout=DIST_TIMEOUT))
    return dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


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


def first_line(e):
    """An exception's first line of text, or its type's name when it has none (IndexError(), EOFError())."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


@contextmanager
def together(dd):
    """A block any rank may stop with a RunError: every rank then raises the same message (the first rank's),
    so none is left waiting in a collective for one that stopped alone."""
    error = None
    try:
        yield
    except RunError as e:
        error = str(e)
    if dd.world > 1:
        errors = [None] * dd.world
        dist.all_gather_object(errors, error, group=dd.flags)
        error = next((e for e in errors if e), None)
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


# ---------------------------------------------------------------- recipe, schedule, checkpoints


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
    tensorboard: bool = False  # also log.jsonl's rows as TensorBoard scalars in out_dir/tensorboard (RunLog)


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
    depth = 1 + max(
        (
            int(encoder_name(n).split(".")[1])
            for n, _ in model.named_parameters()
            if encoder_name(n).startswith("blocks.")
        ),
        default=-1,
    )
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and not name.endswith(("cls_token", "pos_embed"))
        layer = layer_id(name, depth)
        key = (layer, decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": layer_decay ** (depth + 1 - layer),
            }
        groups[key]["params"].append(p)
    return list(groups.values())


def write_atomic(path, write):
    """write(temporary path), then rename it to path: a crash never leaves a half-written file. A write that
    fails (a full disk) removes the temporary and stops with one line; the file at path stays as it was. The
    temporary is this process's alone: processes that write the same file at once (nodes sharing a cache) never
    write into one temporary."""
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
    """The out-dir, created by rank 0 and locked by it for the run's life: one run at a time writes there.
    flock ends with the process that holds it, so a killed run leaves no stale lock; it holds across the
    nodes of NFS (Linux maps it to NFS locks)."""
    lock = None
    with together(dd):
        if dd.main:
            lock = take_lock(Path(out_dir))
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
        fail(
            f"--out-dir {out_dir} is in use by another run ({holder}, {out_dir / '.lock'}); "
            "wait for it to end, or pass another --out-dir"
        )
    except OSError as e:  # a file system without flock (Lustre mounted without -o flock): run unlocked, and say so
        print(f"note: {out_dir} cannot be locked ({first_line(e)}); make sure no other run writes there")
    lock.truncate(0)
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    return lock


@contextmanager
def stop_on_signals():
    """SIGINT (Ctrl-C) and SIGTERM (a scheduler's notice before preemption) set a flag that the loop reads at
    each step: every rank then checkpoints at that step and stops. A second signal at least 2 s later stops at
    once (the first one may reach a process twice: from the terminal and from torchrun, which forwards it)."""
    received = []

    def note(signum, frame):
        if received and time.monotonic() - received[0][1] > 2:
            raise KeyboardInterrupt
        received.append((signal.Signals(signum).name, time.monotonic()))

    if threading.current_thread() is not threading.main_thread():  # handlers can be set in the main thread alone
        yield received
        return
    old = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


# ---------------------------------------------------------------- data


def derive_seed(*parts):
    """A 63-bit seed from integers, e.g. (seed, epoch, index): unrelated seeds for different parts."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


class Seeded(Dataset):
    """A training set read as dataset[(index, seed)]: the RNG is seeded per item before its augmentation, so an
    image's crop and flip depend on (seed, epoch, index) alone, not on the worker count, on which worker fetches
    it, or on where a run resumed: a crash-and-rerun (or a stop mid-epoch) repeats the same augmentations."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        torch.default_generator.manual_seed(seed)
        return self.dataset[index]


class TrainSampler(DistributedSampler):
    """DistributedSampler's order (seed, epoch; each rank its shard) as (index, augmentation seed) pairs for
    `Seeded`, from item `skip` on: an epoch resumed part-way leaves out the items its steps have seen."""

    skip = 0

    def __iter__(self):
        for index in itertools.islice(super().__iter__(), self.skip, None):
            yield index, derive_seed(self.seed, self.epoch, index)

    def __len__(self):
        return self.num_samples - self.skip


class Shard(Sampler):
    """A held-out set's rank r share: items r, r + world, ... Each item once: DistributedSampler pads the
    shards to one length with repeated items, which an evaluation would count twice."""

    def __init__(self, n, dd):
        self.indices = range(dd.rank, n, dd.world)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


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
    """Every process sees its own shard; order depends only on (seed, epoch), also in one process, and a
    training item's augmentation on (seed, epoch, index) (`Seeded`). Held-out sets are sharded unpadded."""
    if train and len(dataset) // dd.world < batch_size:
        fail(f"--batch-size {batch_size} is larger than the {len(dataset) // dd.world} training images per process")
    if train:
        sampler = TrainSampler(dataset, num_replicas=dd.world, rank=dd.rank, shuffle=True, seed=seed, drop_last=True)
        dataset = Seeded(dataset)
    else:
        sampler = Shard(len(dataset), dd)
    workers = (8 if dd.device.type == "cuda" else 0) if workers < 0 else workers
    if data.skips_bad_files(dataset):
        collate_fn = partial(data.skip_none_collate, collate=collate_fn or default_collate)
    return DataLoader(
        dataset, batch_size, sampler=sampler, num_workers=workers, pin_memory=dd.device.type == "cuda", drop_last=train,
        persistent_workers=workers > 0, collate_fn=collate_fn,
    )


@torch.no_grad()
def evaluate(model, loader, dd, seed, precision=autocast):
    """Metrics averaged over a held-out set, weighted by batch size and summed over processes.

    Runs under a fixed seed (the sampler and pairs of PART are random), so epochs compare
    like with like, and restores the training RNG after.
    """
    model.eval()
    sums, count = {}, 0
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
                sums[k] = sums.get(k, 0) + v.double() * len(x)
            count += len(x)
    model.train()
    shards = gather(dd, ({k: v.item() for k, v in sums.items()}, count))  # a rank may hold no batch at all
    count = sum(n for _, n in shards)
    if count == 0:
        fail("no held-out item could be read: every file of the held-out split was skipped as unreadable")
    names = dict.fromkeys(k for s, _ in shards for k in s)
    return {k: sum(s.get(k, 0.0) for s, _ in shards) / count for k in names}


# ---------------------------------------------------------------- the loop


def fit(
    model, train_set, val_set, recipe, out_dir, config, dd, best_key=None, evaluate_fn=None, collate_fn=None,
    train_collate_fn=None, precision=autocast, on_epoch=None,
):
    """Train `model` (forward(x, y) -> (loss, metrics)) and return the last held-out metrics.

    evaluate_fn(model, val_loader, dd, seed) -> {name: float} runs after every epoch (default:
    `evaluate`, the batch-weighted mean of the model's metrics). out_dir gets checkpoint.pt
    (every epoch, and at a stop or every --save-every-min within one), checkpoint_best.pt (when metric
    best_key improves, higher is better) and log.jsonl. A run finds its own checkpoint there and
    resumes. collate_fn batches both sets; train_collate_fn, when given, the training set alone (MixUp /
    CutMix). precision(device) is the context forward runs in; on_epoch(epoch, epochs), when given, is
    called before each epoch (0-based).
    """
    out_dir = Path(out_dir)
    train_loader = make_loader(
        train_set, recipe.batch_size, dd, recipe.seed, recipe.workers, True, train_collate_fn or collate_fn
    )
    val_loader = make_loader(val_set, recipe.batch_size, dd, recipe.seed, recipe.workers, False, collate_fn)
    steps_per_epoch, eff_batch, lr, schedule = lr_schedule(recipe, len(train_loader), dd.world)
    model.to(dd.device)
    optimizer = torch.optim.AdamW(
        param_groups(model, recipe.weight_decay, recipe.layer_decay), lr=lr, betas=(0.9, recipe.beta2)
    )
    config = with_record(config, recipe, dd, eff_batch, lr)
    with out_dir_lock(out_dir, dd), stop_on_signals() as signals:
        progress = resume(out_dir / "checkpoint.pt", model, optimizer, config, dd, steps_per_epoch)
        if progress.epoch >= recipe.epochs:
            if dd.main:
                print(
                    f"{out_dir / 'checkpoint.pt'} is a finished run of {progress.epoch} epochs: nothing to train "
                    "(raise --epochs to continue it)"
                )
            return progress.metrics
        if dd.main:
            write_record(out_dir, config)
            print(
                f"batch {recipe.batch_size}/process x {dd.world} processes x {recipe.accum} accumulation = "
                f"{eff_batch} effective; "
                + (f"lr {lr:.3g} (--lr)" if recipe.lr else f"base lr {recipe.blr:.3g} -> lr {lr:.3g}")
                + (f", below --min-lr {recipe.min_lr:.3g}: the cosine rises to it" if lr < recipe.min_lr else "")
                + f"; {steps_per_epoch} steps/epoch, "
                f"{recipe.epochs * steps_per_epoch} steps in all; device {dd.device}"
            )
        loop = Loop(
            model, wrap(model, recipe, dd), optimizer, schedule, recipe, dd, config, out_dir, steps_per_epoch,
            precision, signals, train_loader, progress,
        )
        with RunLog(out_dir, recipe.tensorboard) if dd.main else nullcontext() as loop.log:
            for epoch in range(progress.epoch, recipe.epochs):
                first_step = progress.epoch_step if epoch == progress.epoch else 0
                train_loader.sampler.set_epoch(epoch)
                train_loader.sampler.skip = first_step * recipe.accum * recipe.batch_size
                if on_epoch:
                    on_epoch(epoch, recipe.epochs)
                loop.train_one_epoch(epoch, first_step)
                agree_on_buffers(model, dd)
                metrics = (evaluate_fn or partial(evaluate, precision=precision))(model, val_loader, dd, recipe.seed)
                loop.end_of_epoch(epoch, metrics, best_key)
        return loop.metrics


def agree_on_buffers(model, dd):
    """Every rank takes rank 0's buffers (a linear probe's BatchNorm statistics): DDP broadcasts them before each
    forward, so after an epoch's last step each rank holds its own update; evaluated and saved, they are one."""
    if dd.world > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def with_record(config, recipe, dd, eff_batch, lr):
    """The run's config with what ran it: the world size and effective batch, compared on resume like any recipe
    field (another GPU count changes the batch and lr), and under "record" (which resume ignores) the command
    line, the code's commit and whether it was dirty, versions, the device and the lr. Rank 0 writes the same to
    out_dir/run.json when the run starts (write_record), readable without torch."""
    record = {"argv": [Path(sys.argv[0]).name, *sys.argv[1:]], **git_state(), "versions": versions(),
              "device": device_name(dd.device), "devices": torch.cuda.device_count() if dd.device.type == "cuda" else 1,
              "world_size": dd.world, "effective_batch": eff_batch, "lr": lr}
    return {**config, "recipe": {**config.get("recipe", {}), "world_size": dd.world, "effective_batch": eff_batch},
            "record": record}


def git_state():
    """The commit of the code that runs and whether its tree differs from it; None outside a git checkout."""
    here = Path(__file__).parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    if commit.returncode:
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


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"


def write_record(out_dir, config):
    """out_dir/run.json: the run's config with its record, as JSON a person can read (timm's args.yaml, DINO's git
    SHA and args), written atomically at every start; a resume adds the new start to its list of starts."""
    path = Path(out_dir) / "run.json"
    starts = json.loads(path.read_text()).get("starts", []) if path.is_file() else []
    record = {**config, "starts": [*starts, {"time": time.strftime("%Y-%m-%d %H:%M:%S"), **config["record"]}]}
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(record, indent=1, default=str)))


def wrap(model, recipe, dd):
    """DDP, then torch.compile of the DDP module: compiled so, DDP's graph splits at its buckets and gradient
    all-reduces overlap the backward (compiling first and wrapping after leaves them to the end)."""
    if dd.world > 1:
        model = DDP(model, device_ids=[dd.device.index] if dd.device.type == "cuda" else None)
    return torch.compile(model) if recipe.compile else model


@dataclass
class Progress:
    """Where a run stands: epochs done, optimizer steps done in the next one (a checkpoint written at a stop
    or by --save-every-min), unreadable files skipped in those steps, the best metric and the last metrics."""

    epoch: int = 0
    epoch_step: int = 0
    skipped: int = 0
    best: float = -math.inf
    metrics: dict = field(default_factory=dict)


class Loop:
    """What the loop carries from step to step, and the steps: train_one_epoch, after_step, end_of_epoch, save."""

    def __init__(
        self, raw, model, optimizer, schedule, recipe, dd, config, out_dir, steps_per_epoch, precision, signals,
        train_loader, progress,
    ):
        self.raw, self.model = raw, model  # raw: unwrapped and uncompiled, what checkpoints hold and evaluate runs
        self.optimizer, self.schedule, self.recipe, self.dd, self.config = optimizer, schedule, recipe, dd, config
        self.out_dir, self.ckpt_path, self.steps_per_epoch = out_dir, out_dir / "checkpoint.pt", steps_per_epoch
        self.precision, self.signals, self.loader = precision, signals, train_loader
        self.skips_files = data.skips_bad_files(train_loader.dataset)
        self.best, self.metrics, self.first_epoch = progress.best, progress.metrics, progress.epoch
        self.skipped = progress.skipped if dd.main else 0  # unreadable files, a checkpoint's sum on rank 0
        self.log, self.saved_at, self.t_run = None, time.monotonic(), time.perf_counter()

    def train_one_epoch(self, epoch, first_step):
        """One pass over the loader from optimizer step `first_step` on: forward, backward, and every
        `recipe.accum` micro-batches an optimizer step at lr schedule(step). Each micro-batch's randomness (PART's
        pairs, drop-path) is seeded from (seed, rank, epoch, micro-batch), so a resumed epoch repeats it."""
        r, dd = self.recipe, self.dd
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        micro_batches, first = self.steps_per_epoch * r.accum, first_step * r.accum
        bar = tqdm(
            self.loader, desc=f"epoch {epoch + 1}/{r.epochs}", disable=not dd.main, leave=False, initial=first,
            total=micro_batches,
        )
        self.t_epoch = self.t_log = t0 = time.perf_counter()
        self.t_data, self.n_img, loss = 0.0, 0, None
        for i, batch in enumerate(bar, start=first):
            if i >= micro_batches:
                break
            self.skipped += r.batch_size - (0 if batch is None else len(batch[0]))  # unreadable files
            if self.skips_files and agree(dd, batch is None)[0]:  # a rank without a batch: all skip it together
                continue
            x, y = to_device(batch, dd.device)
            self.t_data += time.perf_counter() - t0
            torch.manual_seed(derive_seed(r.seed, dd.rank, epoch, i))
            last_micro = (i + 1) % r.accum == 0
            with nullcontext() if last_micro or dd.world == 1 else self.model.no_sync():  # DDP syncs the last one
                with self.precision(dd.device):
                    loss, metrics = self.model(x, y)
                (loss / r.accum).backward()
            self.n_img += len(x) * dd.world
            if last_micro:
                self.after_step(epoch, i // r.accum + 1, loss.detach(), metrics, bar)
            t0 = time.perf_counter()
        if first >= micro_batches:  # resumed from a checkpoint at the epoch's last step: only its end is left
            return
        if loss is None:
            fail(f"every batch of epoch {epoch + 1} was unreadable: --skip-bad-files skipped all of its files")
        value = loss.item()
        self.check_finite(value, (epoch + 1) * self.steps_per_epoch, agree(dd, not math.isfinite(value))[0])

    def after_step(self, epoch, epoch_step, loss, metrics, bar):
        """The optimizer step that ends micro-batches; then, agreed by all ranks: a stop (a signal), a non-finite
        loss (at log steps, where the loss is read anyway), a checkpoint (--save-every-min, rank 0's clock)."""
        r, step = self.recipe, epoch * self.steps_per_epoch + epoch_step  # optimizer steps done, this one included
        step_lr = self.schedule(step - 1)
        for g in self.optimizer.param_groups:
            g["lr"] = step_lr * g["lr_scale"]  # the lr_scale of layer decay
        if r.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), r.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        logging = step % r.log_every == 0
        value = loss.item() if logging else 0.0  # .item() waits for the GPU: at log steps only
        due = self.dd.main and r.save_every_min > 0 and time.monotonic() - self.saved_at > 60 * r.save_every_min
        stop, save, bad = agree(self.dd, self.signals, due, not math.isfinite(value))
        self.check_finite(value, step, bad)
        if logging and self.dd.main:
            elapsed = time.perf_counter() - self.t_log
            row = {
                "epoch": epoch + 1,
                "step": step,
                "lr": step_lr,
                **{k: v.item() for k, v in metrics.items()},
                "img_per_s": self.n_img / elapsed,
                "data_share": self.t_data / elapsed,
            }
            bar.set_postfix(loss=f"{value:.4f}", img_s=f"{row['img_per_s']:.0f}")
            self.log.write(row)
        if logging:
            self.t_log, self.t_data, self.n_img = time.perf_counter(), 0.0, 0
        if stop or save:
            self.save(epoch, epoch_step)
        if stop:
            self.stop(f"at step {step} (step {epoch_step} of {self.steps_per_epoch} in epoch {epoch + 1})")

    def check_finite(self, loss, step, bad):
        """bad (agreed by all ranks): some rank's loss is non-finite; every rank then stops with the same line."""
        if not bad:
            return
        values = gather(self.dd, loss)
        rank = next(i for i, v in enumerate(values) if not math.isfinite(v))
        last = f"the last good checkpoint is {self.ckpt_path}" if self.ckpt_path.exists() else "no checkpoint yet"
        where = f" on rank {rank}" if self.dd.world > 1 else ""
        fail(f"loss is {values[rank]} at step {step}{where}; stopping ({last}). Try a lower --blr or --clip-grad 1.0")

    def end_of_epoch(self, epoch, metrics, best_key):
        """The epoch's summary (printed, logged), then its checkpoint; a stop asked for during the epoch's
        evaluation ends the run here."""
        dd, improved = self.dd, False
        skipped = sum(gather(dd, self.skipped))
        with together(dd):
            if dd.main:
                done = epoch + 1 - self.first_epoch
                eta = (time.perf_counter() - self.t_run) / done * (self.recipe.epochs - epoch - 1)
                summary = {
                    "epoch": epoch + 1,
                    "step": (epoch + 1) * self.steps_per_epoch,
                    "epoch_s": time.perf_counter() - self.t_epoch,
                    **({"skipped_files": skipped} if skipped else {}),
                    **{f"val_{k}": v for k, v in metrics.items()},
                }
                report_epoch(summary, self.log, eta if epoch + 1 < self.recipe.epochs else None)
                if best_key is not None and best_key not in metrics:
                    fail(
                        f"the held-out evaluation gave no {best_key!r} to keep the best checkpoint by "
                        f"(it gave {', '.join(metrics) or 'nothing'})"
                    )
                improved = best_key is not None and metrics[best_key] > self.best
                self.best = metrics[best_key] if improved else self.best
        self.metrics, self.skipped = metrics, 0
        self.save(epoch + 1, 0, improved)
        if agree(dd, self.signals)[0] and epoch + 1 < self.recipe.epochs:
            self.stop(f"after epoch {epoch + 1}")

    def save(self, epochs_done, epoch_step, improved=False):
        """The run after `epochs_done` epochs and `epoch_step` steps of the next, written by rank 0 while the others
        wait to learn whether it worked. The best weights go first: a crash between the two writes leaves a best
        checkpoint no older than the last, never a last one that records a best that was not written."""
        skipped = sum(gather(self.dd, self.skipped))
        with together(self.dd):
            if self.dd.main:
                state = {
                    "model": self.raw.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "epoch": epochs_done,
                    "epoch_step": epoch_step,
                    "skipped": skipped,
                    "step": epochs_done * self.steps_per_epoch + epoch_step,
                    "steps_per_epoch": self.steps_per_epoch,
                    "config": self.config,
                    "best": self.best,
                    "metrics": self.metrics,
                }
                if improved:
                    save_checkpoint(self.out_dir / "checkpoint_best.pt", state)
                save_checkpoint(self.ckpt_path, state)
        self.saved_at = time.monotonic()

    def stop(self, where):
        """Every rank stops with one line, after the checkpoint of where the run is was written."""
        name = next(n for n in gather(self.dd, self.signals[0][0] if self.signals else None) if n)
        fail(f"stopped by {name} {where}; {self.ckpt_path} holds the run: rerun the same command to resume from there")


def report_epoch(summary, log, eta_s=None):
    """An epoch's summary row (plus peak memory on CUDA) printed, with the time left, and written to the RunLog."""
    if torch.cuda.is_available():
        summary["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(
        " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items())
        + (f"; about {eta_s / 60:.1f} min to go" if eta_s is not None else "")
    )
    log.write(summary)


class RunLog:
    """Rank 0's record of a run's rows (steps and epoch summaries): log.jsonl, one JSON row a line; with
    tensorboard, also each number of a row as a TensorBoard scalar at the row's step, in out_dir/tensorboard.
    The events are rebuilt from log.jsonl at every start, so they follow it where a resume cut it back."""

    def __init__(self, out_dir, tensorboard=False):
        self.events = tensorboard_writer(out_dir / "tensorboard") if tensorboard else None
        self.file = open(out_dir / "log.jsonl", "a")
        if self.events:
            for line in (out_dir / "log.jsonl").read_text().splitlines():
                self.add_scalars(json.loads(line))

    def add_scalars(self, row):
        for name, value in row.items():
            if name not in ("epoch", "step") and isinstance(value, (int, float)):
                self.events.add_scalar(name, value, row["step"])

    def write(self, row):
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.events:
            self.add_scalars(row)
            self.events.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()
        if self.events:
            self.events.close()


def tensorboard_writer(folder):
    """A TensorBoard writer of a fresh `folder` (events of an earlier start go: RunLog rewrites them)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional: imported for --tensorboard alone
    except ImportError:
        fail("--tensorboard needs the tensorboard package: pip install tensorboard")
    shutil.rmtree(folder, ignore_errors=True)
    return SummaryWriter(str(folder))


def lr_schedule(recipe, batches, world):
    """-> optimizer steps per epoch, effective batch, peak lr (--lr, else blr x effective batch / 256, MAE's
    rule), and the schedule: step -> lr."""
    steps_per_epoch = batches // recipe.accum
    if steps_per_epoch == 0:
        fail(f"--accum {recipe.accum} is more than the {batches} batches of an epoch")
    eff_batch = recipe.batch_size * recipe.accum * world
    lr = recipe.lr or recipe.blr * eff_batch / 256
    schedule = partial(
        lr_at, lr=lr, warmup_steps=int(recipe.warmup_epochs * steps_per_epoch),
        total_steps=recipe.epochs * steps_per_epoch, min_lr=recipe.min_lr,
        drop_steps=[int(e * steps_per_epoch) for e in recipe.lr_drops],
    )
    return steps_per_epoch, eff_batch, lr, schedule


# ---------------------------------------------------------------- resume

RESUMABLE = {  # may change on resume
    "epochs", "workers", "log_every", "save_every_min", "compile", "grad_ckpt", "resume_changed", "tensorboard",
}
# where the data came from: another location needs --resume-changed (the same data may have moved); checkpoints
# written before it was recorded lack it
DATA_DIR = "data_dir"


def flat(config, prefix=""):
    """A nested config as {"a.b": value} pairs."""
    out = {}
    for k, v in config.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_same_run(path, old_config, config):
    """Stops when the checkpoint at path is of another model or data, or of another recipe or data location
    unless --resume-changed. A setting the checkpoint does not record was added to the code after it was
    written: the run trained without it, which is the setting left off (False, None or 0), so only its being on
    is a change; a run started before an upgrade resumes after it."""
    old, new = flat(old_config), flat(config)
    changed = [
        k
        for k in sorted(old.keys() | new.keys())
        if old.get(k) != new.get(k)
        and k.removeprefix("recipe.") not in RESUMABLE
        and not k.startswith("record.")  # what ran it (command, commit, versions): a rerun may differ
        and not (k not in old and (k == DATA_DIR or new[k] in (None, False)))  # not recorded then; False == 0 == 0.0
    ]
    described = [f"{k.removeprefix('recipe.')}: {old.get(k)} -> {new.get(k)}" for k in changed]
    run_changed = [d for k, d in zip(changed, described) if not k.startswith("recipe.") and k != DATA_DIR]
    if run_changed:
        fail(
            f"{path} holds a run of another model or data ({', '.join(run_changed[:4])}); "
            "pass a new --out-dir, or delete it to start over"
        )
    if changed and not config.get("recipe", {}).get("resume_changed"):
        what = "data location" if changed == [DATA_DIR] else "recipe" + (" and data location" * (DATA_DIR in changed))
        fail(
            f"{path} was trained with another {what} ({', '.join(described)}); "
            "rerun with its flags, or add --resume-changed to continue with the new values"
        )


def read_run_checkpoint(path, config):
    """The run's own checkpoint, checked: a file of ours, of this run."""
    ckpt = load_checkpoint(path)
    missing = [k for k in ("model", "optimizer", "epoch", "step") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        fail(
            f"{path} has no {', '.join(missing)}: not a checkpoint that a run of ours wrote; move it away to start over"
        )
    check_same_run(path, ckpt.get("config", {}), config)
    return ckpt


def resume(ckpt_path, model, optimizer, config, dd, steps_per_epoch):
    """The run's own checkpoint into model and optimizer -> Progress; Progress() without one. Stops when
    the checkpoint is not of this run (check_same_run); cuts log.jsonl back to the checkpoint. Rank 0
    decides: every rank must see the checkpoint rank 0 sees (a --out-dir that all nodes share), or all stop
    with one line, where they would otherwise train replicas that diverge."""
    with together(dd):
        ckpt = read_run_checkpoint(ckpt_path, config) if ckpt_path.exists() else None
        best = best_so_far(ckpt, ckpt_path) if ckpt else -math.inf
    seen = gather(dd, ((ckpt["epoch"], ckpt["step"]) if ckpt else None, str(ckpt_path)))
    if seen[0][0] is None:
        if dd.main:  # the rows of an attempt killed before its first checkpoint are redone: they go
            truncate_log(ckpt_path.parent / "log.jsonl", (0, 0, 0))
        return Progress()
    odd = next((r for r, (at, _) in enumerate(seen) if at != seen[0][0]), None)
    if odd is not None:
        (at, path), step = seen[odd], seen[0][0][1]
        sees = f"a checkpoint at step {at[1]}" if at else "no checkpoint"
        fail(
            f"rank {odd} sees {sees} at {path} where rank 0 resumes from step {step}: every process must see "
            "the same --out-dir; put it on a file system that all nodes share"
        )
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    epoch_step = ckpt.get("epoch_step", 0) * steps_per_epoch // ckpt.get("steps_per_epoch", steps_per_epoch)
    with together(dd):
        if dd.main:
            truncate_log(ckpt_path.parent / "log.jsonl", log_position(ckpt))
            part_way = f" and {ckpt['epoch_step']} steps of epoch {ckpt['epoch'] + 1}" if ckpt.get("epoch_step") else ""
            print(f"resuming from {ckpt_path} after epoch {ckpt['epoch']}{part_way}")
    return Progress(ckpt["epoch"], epoch_step, ckpt.get("skipped", 0), best, ckpt.get("metrics", {}))


def best_so_far(ckpt, ckpt_path):
    """The metric a new best must beat: checkpoint_best.pt's, which is written first and so is never behind
    the last checkpoint's record (a crash may fall between the two writes)."""
    best_path = ckpt_path.parent / "checkpoint_best.pt"
    best = ckpt.get("best", -math.inf)
    if best_path.is_file():
        best = max(best, load_checkpoint(best_path, mmap=True).get("best", best))
    return best


def log_position(row):
    """A log.jsonl row's or a checkpoint's place in the run, (epoch, step, end), compared in that order: step
    numbers restart lower when a resume changes the steps per epoch; end is 1 for an epoch's summary row (it has
    epoch_s) and for a checkpoint written at an epoch's end, 0 for step rows and checkpoints part-way into an
    epoch, which count in it, so that one at the epoch's last step keeps its steps but not its summary."""
    if "epoch_step" in row:  # a checkpoint: "epoch" counts epochs done
        return row["epoch"] + (1 if row["epoch_step"] else 0), row["step"], 0 if row["epoch_step"] else 1
    return row["epoch"], row["step"], int("epoch_s" in row)


def truncate_log(path, position):
    """Keep the log.jsonl rows up to the checkpoint's position, rewritten atomically: the rows of steps that the
    resumed run redoes go. A last line that is not JSON, cut short by a kill, goes too; any other stops the run."""
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


def run(command):
    """Run a training command with distributed setup around it. The process group is destroyed after a run
    that ended well only: after an error, other ranks may be gone and NCCL's teardown could wait for them."""
    dd = setup_distributed()
    result = command(dd)
    if dd.world > 1:
        dist.destroy_process_group()
    return result
