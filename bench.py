"""Performance: a PART pretraining step timed beside a bare ViT step and beside the baselines' steps on
this device (images/s, ratios, GFLOP, peak memory, MFU on CUDA), and the pre-flight a user runs on a GPU
node before a multi-day job. `python train.py bench [--methods | --preflight]` runs them.
"""

import itertools
import resource
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch._dynamo.utils import counters
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import baselines
import part
from engine import autocast, local_device


def bench(vit, size, batch_size, num_patches, pairs, sampler, head, steps, use_compile, methods):
    """A line per (N, K) of num_patches x pairs: the PART step beside the bare ViT step; with methods,
    every method's step (defaults, PART's as given) on the same ViT and images."""
    device = local_device()
    print(
        f"ViT {vit.embed_dim} wide x {vit.depth}, patch {vit.patch_size}, at {'x'.join(map(str, size))}px, batch "
        f"{batch_size}, {head}, {sampler}, on {describe(device)}; "
        "PART: sampler + ViT + head + loss; bare ViT: the same ViT on the same patches, no sampler, no head"
    )
    for n, k in itertools.product(num_patches, pairs):
        cfg = config("part", vit, size, sampler=sampler, num_patches=n, num_pairs=k, head=head)
        bench_one(cfg, batch_size, steps, use_compile, device)
    if methods:
        bench_methods(vit, size, batch_size, steps, device, sampler=sampler, num_pairs=pairs[0], head=head)


def config(method, vit, size, **flags):
    """The pretext config of `method` for random uint8 images, which any mean and std suit."""
    stats = dict(mean=(0.5,) * vit.in_chans, std=(0.25,) * vit.in_chans)
    return baselines.pretext_config(method, vit=vit, img_size=size, **stats, **flags)


def train_step(forward, images, optimizer, device):
    """One optimizer step on forward(images) -> (loss, extras), as a function to time."""

    def step():
        with autocast(device):
            loss, _ = forward(images)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


# dense bf16 peaks from the vendor sheets, the first name the device's contains wins: NVL and PCIe before SXM
PEAK_BF16_FLOPS = {
    "H100 NVL": 835e12,
    "H200 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
}


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


def bench_methods(vit, size, batch_size, steps, device, **part_flags):
    """A pretraining step of each method (the default flags, PART's as given) on the same ViT and images,
    timed in turn: ms per step, the ratio to PART's, and GFLOP per image."""
    images = torch.randint(0, 256, (batch_size, vit.in_chans, *size), dtype=torch.uint8, device=device)
    steps_of = {}
    for method in baselines.METHODS:
        torch.manual_seed(0)
        model = baselines.pretext_model(method, config(method, vit, size, **part_flags)).to(device)
        steps_of[method] = train_step(model, images, torch.optim.AdamW(model.parameters(), lr=1e-4), device)
    times = dict(zip(steps_of, timed(list(steps_of.values()), steps, device)))
    for method, step in steps_of.items():
        print(
            f"{method:8s} step {times[method] * 1e3:8.1f} ms = {batch_size / times[method]:7.1f} img/s, "
            f"{times[method] / times['part']:.2f} x PART's; GFLOP/img (fwd+bwd) "
            f"{count_flops(step) / batch_size / 1e9:.3g}"
        )


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

    def bare_vit(x):  # the same patches through the encoder, a stand-in loss
        return model.encoder.forward_features(x).float().square().mean(), None

    step, vit_step = train_step(forward, images, optimizer, device), train_step(bare_vit, patches, optimizer, device)
    t_step, t_vit, t_sample = timed([step, vit_step, lambda: model.sample(images)], steps, device)
    flops, vit_flops = (count_flops(fn) / batch_size / 1e9 for fn in (step, vit_step))  # per image
    peak = peak_flops(device)
    mfu = f"; MFU {flops * 1e9 * batch_size / t_step / peak:.1%} of {peak / 1e12:.0f} TFLOP/s bf16" if peak else ""
    print(
        f"N {cfg.num_patches:4d}, K {cfg.num_pairs:5d}: PART step {t_step * 1e3:8.1f} ms = {batch_size / t_step:7.1f} "
        f"img/s, bare ViT {t_vit * 1e3:8.1f} ms, ratio {t_step / t_vit:.3f}; sampler {t_sample / t_step:.1%}; "
        f"GFLOP/img (fwd+bwd) {flops:.2f} vs {vit_flops:.2f}; peak memory {peak_memory_gib(device):.2f} GiB{mfu}"
    )


def count_flops(fn):
    """FLOPs of fn(), attention included: its math form is counted on every device (CPU's fused kernel is not)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def peak_flops(device):
    """The device's dense bf16 peak, or None where it is not known (CPUs, other GPUs)."""
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in describe(device)), None)


def describe(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


# ---------------------------------------------------------------- pre-flight


def preflight_variants():
    """Each method with its defaults, PART with --pos-mask (the step that once synced the host), and MAE and
    DropPos with their official code's class token (and DropPos' attentive reconstruction, a second forward)."""
    return [(method, {}) for method in baselines.METHODS] + [
        ("part --pos-mask 0.2", {"pos_mask": 0.2}),
        ("mae --class-token", {"class_token": True}),
        ("droppos --class-token --attentive", {"class_token": True, "attentive": True}),
    ]


def compile_counts():
    """Dynamo's counts since the last reset: (graphs, graph breaks, recompiles); a graph break resumes in a new
    frame, so the frames compiled beyond the first and the breaks' are recompiles."""
    breaks = sum(counters["graph_break"].values())
    return counters["stats"]["unique_graphs"], breaks, max(0, counters["frames"]["total"] - 1 - breaks)


def preflight_step(method, flags, vit, size, batch_size, steps, device, compiled):
    """`steps` pretraining steps of one variant, eager or compiled (inductor on CUDA, dynamo's graphs alone on
    CPU, where inductor's build would take the test suite's minutes) -> its line of figures."""
    torch.manual_seed(0)
    name = method.split()[0]
    model = baselines.pretext_model(name, config(name, vit, size, **flags)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    images = torch.randint(0, 256, (batch_size, vit.in_chans, *size), dtype=torch.uint8, device=device)
    torch._dynamo.reset()
    counters.clear()
    forward = torch.compile(model, backend="inductor" if device.type == "cuda" else "eager") if compiled else model
    step = train_step(forward, images, optimizer, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed([step], steps, device)[0]
    graphs, breaks, recompiles = compile_counts() if compiled else (0, 0, 0)
    peak = peak_flops(device)
    flops = count_flops(step) if peak else None  # eager, after the timing
    mfu = f"MFU {flops / seconds / peak:.1%}" if peak else "MFU unknown for this device"
    dynamo = f"; graphs {graphs}, breaks {breaks}, recompiles {recompiles}" if compiled else ""
    return (
        f"{method:34s} {'compiled' if compiled else 'eager':8s} {seconds * 1e3:8.1f} ms {batch_size / seconds:8.1f} "
        f"img/s; {mfu}; peak {peak_memory_gib(device):.2f} GiB{dynamo}"
    )


def preflight(vit, size, batch_size, steps, num_pairs):
    """Before a multi-day run, on the node it will run on: every method's step eager and compiled, bf16 on CUDA;
    ms, images/s, MFU and peak memory, dynamo's graphs, breaks and recompiles; with 2 or more GPUs, DDP
    replicas equal after a few steps (ddp_replicas_agree). PART's steps take num_pairs."""
    device = local_device()
    print(
        f"pre-flight on {describe(device)}: ViT {vit.embed_dim} wide x {vit.depth}, patch {vit.patch_size}, "
        f"{'x'.join(map(str, size))} px, batch {batch_size}, {steps} timed steps each"
    )
    for method, flags in preflight_variants():
        flags = {"num_pairs": num_pairs, **flags}
        for compiled in (False, True):
            print(preflight_step(method, flags, vit, size, batch_size, steps, device, compiled))
    if device.type == "cuda" and torch.cuda.device_count() >= 2:
        print(f"DDP over 2 GPUs: replicas {'equal' if ddp_replicas_agree(vit, size) else 'DIFFER'} after 3 steps")


def ddp_replica_worker(rank, vit, size, port, result):
    """One of two DDP processes: 3 PART steps, then whether its weights equal rank 0's (result[rank])."""
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.cuda.set_device(rank)
    torch.manual_seed(0)
    model = DDP(part.PART(config("part", vit, size)).cuda(), device_ids=[rank])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    torch.manual_seed(1 + rank)  # each rank its own images and sampling, as in training
    for _ in range(3):
        with autocast(torch.device("cuda")):
            loss, _ = model(torch.randint(0, 256, (8, vit.in_chans, *size), dtype=torch.uint8, device="cuda"))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    theirs = flat.clone()
    dist.broadcast(theirs, 0)
    result[rank] = bool(torch.equal(flat, theirs))
    dist.destroy_process_group()


def ddp_replicas_agree(vit, size):
    """Two DDP processes on GPUs 0 and 1 end 3 steps with equal weights."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = mp.Manager().dict()
    mp.spawn(ddp_replica_worker, args=(vit, size, port, result), nprocs=2)
    return all(result.values())
