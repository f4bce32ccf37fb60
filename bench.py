"""Performance: a PART pretraining step timed beside a bare ViT step and beside the baselines' steps on
this device (images/s, ratios, GFLOP, peak memory, MFU on CUDA). `python train.py bench` runs it.
"""
import itertools
import resource
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import baselines
import part
from engine import autocast, local_device


def bench(vit, size, batch_size, num_patches, pairs, sampler, head, steps, use_compile, methods):
    """A line per (N, K) of num_patches x pairs: the PART step beside the bare ViT step; with methods,
    every method's step (defaults, PART's as given) on the same ViT and images."""
    device = local_device()
    stats = (0.5,) * vit.in_chans, (0.25,) * vit.in_chans
    print(f"ViT {vit.embed_dim} wide x {vit.depth}, patch {vit.patch_size}, at {'x'.join(map(str, size))}px, batch {batch_size}, "
          f"{head}, {sampler}, on {describe(device)}; "
          "PART: sampler + ViT + head + loss; bare ViT: the same ViT on the same patches, no sampler, no head")
    for n, k in itertools.product(num_patches, pairs):
        cfg = baselines.pretext_config("part", vit=vit, img_size=size, mean=stats[0], std=stats[1], sampler=sampler, num_patches=n,
                                       num_pairs=k, head=head)
        bench_one(cfg, batch_size, steps, use_compile, device)
    if methods:
        bench_methods(vit, size, stats, batch_size, steps, device, sampler=sampler, num_pairs=pairs[0], head=head)


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


def bench_methods(vit, size, stats, batch_size, steps, device, **part_flags):
    """A pretraining step of each method (the default flags, PART's as given) on the same ViT and images,
    timed in turn: ms per step, the ratio to PART's, and GFLOP per image."""
    images = torch.randint(0, 256, (batch_size, vit.in_chans, *size), dtype=torch.uint8, device=device)
    steps_of = {}
    for method in baselines.METHODS:
        torch.manual_seed(0)
        model = baselines.pretext_model(method, baselines.pretext_config(method, vit=vit, img_size=size, mean=stats[0], std=stats[1], **part_flags)).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, optimizer=optimizer):
            with autocast(device):
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
