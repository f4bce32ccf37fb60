r"""The commands of PART: pretrain, finetune (and the linear probe), knn, bench, export and show.

    python train.py pretrain                          # PART on Fashion-MNIST, CPU-sized
    torchrun --nproc_per_node=8 train.py pretrain --data in1k --data-dir /data/imagenet --preset vit_b --patch-size 16 \
        --pairs 4802 --epochs 200 --batch-size 128 --blr 1.25e-4 --warmup-epochs 10   # 8.1: lr 5e-4 at 1024
    python train.py finetune                          # the pretrained encoder on Fashion-MNIST's labels
    python train.py knn                               # kNN top-1 of the frozen encoder
    python train.py bench --preflight --preset vit_b --img-size 224 --patch-size 16 --in-chans 3 --batch-size 128
    python train.py export --ckpt out/pretrain/checkpoint.pt
    python train.py show --ckpt out/pretrain/checkpoint.pt --image photo.jpg   # section 5.1's figures

Each command builds its data and model and hands them to engine.fit; the models are part.py's and
baselines.py's, the shared flags cli.py's, --init loading and export weights.py's.
"""

import json
import os
import subprocess
import sys
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import click
import torch
import torch.nn.functional as F
from torch.utils.data import Subset

import baselines
import bench as benchmark
import data
import part
import weights
from cli import (
    COUNT, HEAD_HELP, NON_NEGATIVE, OUT_DIR_HELP, POSITIVE, XAVIER_HELP, Cli, Finite, method_config, method_options,
    options, pretrain_summary, recipe_from, recipe_options, take,
)
from engine import Dist, UserError, autocast, fail, fit, local_device, make_loader, progress, run
from vit import PRESETS, set_grad_checkpointing, vit_config


@click.group(cls=Cli)
def main():
    """PART: pretraining, finetuning and tools. See README.md."""


data_options = options(
    click.option(
        "--data", "data_name", type=click.Choice(list(data.DATASETS)), default="fashion-mnist",
        help="dataset; README lists the --data-dir layout of each",
    ),
    click.option("--data-dir", default=None, help="dataset root; fashion-mnist falls back to Debian's package"),
    click.option("--img-size", type=POSITIVE, default=None, help="square side in pixels; default: the dataset's"),
    click.option(
        "--in-chans", type=POSITIVE, default=None,
        help="default: the dataset's; folders of images read 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA)",
    ),
    click.option(
        "--mean", type=Finite(), multiple=True, help="input mean per channel, the flag repeated; default: the dataset's"
    ),
    click.option("--std", type=Finite(), multiple=True, help="input std per channel, as --mean"),
    click.option(
        "--train-subset", type=COUNT, default=0, help="train on N random training images (drawn under --seed); 0: all"
    ),
    click.option(
        "--val-from-train",
        type=COUNT,
        default=0,
        help="hold out N training images (one fixed draw, whatever --seed) as the held-out set in place of the "
        "dataset's val split, to choose hyperparameters without the test images; --train-subset draws from the rest; "
        "0: off",
    ),
    click.option(
        "--skip-bad-files", is_flag=True, help="skip and count unreadable image files instead of stopping at the first"
    ),
    section="data",
)


DATA_FLAGS = (
    "data_name", "data_dir", "img_size", "in_chans", "mean", "std", "train_subset", "val_from_train", "skip_bad_files",
)
# the draw of --val-from-train: fixed, so every seed and method is selected on the same images
VAL_FROM_TRAIN_SEED = 20240


def load_sets(flags, train_transform, val_transform, seed=0):
    """Train and val sets of the data_options `flags`. val_from_train holds out that many training images (one
    fixed draw) as the val set; train_subset then keeps that many training images, drawn under `seed`; with
    skip_bad_files an unreadable image's item is the next readable one (data.SkipBadFiles)."""
    name = flags["data_name"]
    info = data.data_info(name, flags["img_size"], flags["in_chans"], flags["mean"], flags["std"])

    def build(split, transform):
        return data.build_dataset(name, flags["data_dir"], split, info, transform(info, name))

    train_set = build("train", train_transform)
    held_out = flags.get("val_from_train", 0)  # flags built by hand (knn's) hold out nothing
    if held_out and held_out >= len(train_set):
        fail(f"--val-from-train {held_out} leaves none of the {len(train_set)} training images to train on")
    if held_out:
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(VAL_FROM_TRAIN_SEED)).tolist()
        val_set = Subset(build("train", val_transform), sorted(order[:held_out]))
        train_set = Subset(train_set, sorted(order[held_out:]))
    else:
        val_set = build("val", val_transform)
    subset = flags["train_subset"]
    if subset > len(train_set):
        fail(
            f"--train-subset {subset} is more than the {len(train_set)} training images"
            + (" --val-from-train leaves" if held_out else "")
        )
    if subset:
        keep = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed))[:subset]
        train_set = Subset(train_set, keep.tolist())
    if flags["skip_bad_files"]:  # outermost, so that a skip stays within the subset
        train_set, val_set = data.SkipBadFiles(train_set), data.SkipBadFiles(val_set)
    return info, train_set, val_set


def data_config(flags):
    """The data flags a run's config records, so that a resume on other data stops; the data as an absolute
    path (--data-dir, or fashion-mnist's fallback); val_from_train only when set, so runs without it still resume."""
    name, data_dir = flags["data_name"], flags["data_dir"]
    source = str(Path(data.fashion_mnist_dir(data_dir) if name == "fashion-mnist" else data_dir or ".").resolve())
    held_out = {"val_from_train": flags["val_from_train"]} if flags["val_from_train"] else {}
    return {"data": name, "data_dir": source, "train_subset": flags["train_subset"], **held_out}


model_options = options(
    click.option(
        "--preset", type=click.Choice(list(PRESETS)), default="vit_mini",
        help="ViT width and depth; the paper: vit_s at 32 px, vit_b at 224 px",
    ),
    click.option("--patch-size", type=POSITIVE, default=4, help="P; the paper: 4 at 32 px, 16 at 224 px"),
    click.option("--drop-path", type=Finite(0, 1, max_open=True), default=0.0, help="stochastic depth"),
    click.option("--xavier-init", is_flag=True, help=XAVIER_HELP),
    section="model",
)


@main.command()
@data_options
@model_options
@method_options()
@options(
    click.option("--num-patches", type=COUNT, default=0, help="part: N; 0: (H/P)(W/P) as the paper"),
    click.option(
        "--pairs", "num_pairs", type=POSITIVE, default=128,
        help="part: K (ref, tgt) pairs per image; the paper sweeps 512-4096 at 64-196 patches (Figure 8)",
    ),
    section="method",
)
@recipe_options(epochs=3, batch_size=256, blr=1.5e-3, warmup_epochs=0.3, log_every=50)
@click.option("--out-dir", default="out/pretrain", help=OUT_DIR_HELP)
def pretrain(preset, patch_size, drop_path, xavier_init, method, out_dir, **kwargs):
    """Self-supervised pretraining: PART (section 4, relative positions of off-grid patches), or MAE,
    DropPos or MP3 on the same ViT, data and loop."""
    recipe, flags = recipe_from(kwargs), take(kwargs, DATA_FLAGS)
    info, train_set, val_set = load_sets(flags, data.pretrain_transform, data.eval_transform, recipe.seed)
    vit = vit_config(
        preset, patch_size=patch_size, in_chans=info.in_chans, drop_path=drop_path, xavier_init=xavier_init
    )
    cfg = method_config(
        method, vit=vit, img_size=(info.img_size, info.img_size), mean=info.mean, std=info.std, **kwargs
    )

    def command(dd):
        torch.manual_seed(recipe.seed)  # the same initial weights on every process
        model = baselines.pretext_model(method, cfg)
        set_grad_checkpointing(model, recipe.grad_ckpt)
        config = {"kind": method, **data_config(flags), "model": cfg.to_dict(), "recipe": asdict(recipe)}
        metrics = fit(
            model, train_set, val_set, recipe, out_dir, config, dd, on_epoch=getattr(model, "set_epoch", None)
        )
        if dd.main:
            print(pretrain_summary(method, metrics, out_dir))

    run(command)


# ---------------------------------------------------------------- finetuning and linear probing


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


def classifier_config(
    info, classes, base, pretrained, preset, patch_size, drop_path, pool, linear_probe, smoothing, xavier_init=False,
    pos_pretrained=False, **protocol,
):
    """The ViT of --init (`base`, from encoder_from_init) unless --preset / --patch-size say otherwise; with
    `pretrained` weights they must then agree with it. pos_pretrained: the weights bring position embeddings.
    protocol: the baselines' own finetuning options, ClassifierConfig's fc_norm, pos_embed and freeze_pos_embed."""
    vit = replace(
        base, **(PRESETS[preset] if preset else {}), patch_size=patch_size or base.patch_size,
        in_chans=info.in_chans, drop_path=0.0 if linear_probe else drop_path, xavier_init=xavier_init,
    )
    size = ("embed_dim", "depth", "num_heads", "patch_size", "in_chans")
    if pretrained and any(getattr(vit, k) != getattr(base, k) for k in size):
        fail(
            "the checkpoint is of another size than asked: its ViT has "
            f"{', '.join(f'{k} {getattr(base, k)}' for k in size)}; "
            f"--preset / --patch-size / the data ask for {', '.join(f'{k} {getattr(vit, k)}' for k in size)}"
        )
    return part.ClassifierConfig(
        vit=vit, img_size=(info.img_size, info.img_size), num_classes=classes, pool=pool, linear_probe=linear_probe,
        smoothing=smoothing, mean=info.mean, std=info.std, pos_pretrained=pos_pretrained, **protocol,
    )


@main.command()
@data_options
@click.option(
    "--init", default=weights.DEFAULT_INIT,
    help="a PART checkpoint (training dict, {'model'}, {'state_dict'} or bare; module.-prefixed or not), or 'scratch'",
)
@click.option(
    "--linear-probe", is_flag=True, help="freeze the encoder; train BatchNorm without affine + a linear head (MAE)"
)
@click.option(
    "--preset", type=click.Choice(list(PRESETS)), default=None,
    help="default: the checkpoint's; vit_mini from scratch",
)
@click.option("--patch-size", type=POSITIVE, default=None, help="default: the checkpoint's; 4 from scratch")
@click.option(
    "--pool", type=click.Choice(part.POOLS), default=None,
    help="the paper: cls; default cls, but avg for a probe of weights without a trained class token (PART's)",
)
@click.option("--xavier-init", is_flag=True, help=XAVIER_HELP + "; the weights --init brings are kept")
@click.option(
    "--fc-norm", is_flag=True,
    help="with --pool avg: a new LayerNorm after the mean in place of the final norm (MAE, DropPos)",
)
@click.option(
    "--no-pos-embed", is_flag=True,
    help="no position embeddings (MP3's Table 1 row 'without'); default: learnable ones (the paper)",
)
@click.option(
    "--freeze-pos-embed", is_flag=True,
    help="keep the pretrained sin-cos position embeddings fixed (DropPos' finetuning)",
)
@click.option("--drop-path", type=Finite(0, 1, max_open=True), default=0.1, help="DeiT: 0.1; 0 with --linear-probe")
@click.option("--smoothing", type=Finite(0, 1, max_open=True), default=0.1, help="label smoothing; DeiT: 0.1")
@click.option("--randaug-n", type=COUNT, default=2, help="RandAugment ops per image, 0: off; DeiT: 2")
@click.option("--randaug-m", type=click.IntRange(0, 30), default=9, help="RandAugment magnitude; DeiT: 9")
@click.option("--mixup", type=NON_NEGATIVE, default=0.0, help="MixUp alpha, 0: off; DeiT: 0.8 (for 300 epochs)")
@click.option("--cutmix", type=NON_NEGATIVE, default=0.0, help="CutMix alpha, 0: off; DeiT: 1.0 (for 300 epochs)")
@click.option("--reprob", type=Finite(0, 1), default=0.25, help="RandomErasing probability; DeiT: 0.25")
@recipe_options(epochs=5, batch_size=128, blr=1e-3, warmup_epochs=1.0, beta2=0.999, log_every=50)
@click.option("--out-dir", default="out/finetune", help=OUT_DIR_HELP)
def finetune(
    init, linear_probe, preset, patch_size, pool, xavier_init, fc_norm, no_pos_embed, freeze_pos_embed, drop_path,
    smoothing, randaug_n, randaug_m, mixup, cutmix, reprob, out_dir, **kwargs,
):
    """Finetune a PART encoder as the paper does (section 4 "Training setup": class token, new
    position embeddings, linear head; DeiT's recipe), or linear-probe it. --init scratch trains the
    same ViT from random weights with the same recipe. As the paper (DeiT), no layer decay unless
    --layer-decay is given, and then for either init alike. --fc-norm, --no-pos-embed and
    --freeze-pos-embed are the baselines' own protocols (README)."""
    recipe, flags = recipe_from(kwargs), take(kwargs, DATA_FLAGS)
    base, state, source = weights.encoder_from_init(init, vit_config("vit_mini", patch_size=4))
    pool = pool or default_pool(state, linear_probe)
    augment = partial(data.finetune_transform, randaug_n=randaug_n, randaug_m=randaug_m, reprob=reprob)
    info, train_set, val_set = load_sets(flags, augment, data.eval_transform, recipe.seed)
    cfg = classifier_config(
        info, count_classes(flags["data_name"], info, train_set), base, state is not None, preset, patch_size,
        drop_path, pool, linear_probe, smoothing, xavier_init,
        pos_pretrained=state is not None and "pos_embed" in state, fc_norm=fc_norm, pos_embed=not no_pos_embed,
        freeze_pos_embed=freeze_pos_embed,
    )

    def command(dd):
        torch.manual_seed(recipe.seed)  # the same new weights on every process
        model = part.Classifier(cfg)
        if state is not None:
            weights.load_encoder(model.encoder, state, source.get("model", {}), init, dd.main)
        augmentation = dict(randaug_n=randaug_n, randaug_m=randaug_m, mixup=mixup, cutmix=cutmix, reprob=reprob)
        config = {"kind": "classifier", **data_config(flags), "init": init, "model": cfg.to_dict()}
        config["recipe"] = {**asdict(recipe), **augmentation}
        set_grad_checkpointing(model, recipe.grad_ckpt)
        metrics = fit(
            model, train_set, val_set, recipe, out_dir, config, dd, best_key="acc",
            train_collate_fn=data.mix_collate(mixup, cutmix, cfg.num_classes),
        )
        if dd.main and metrics:
            what = "linear probe" if linear_probe else "finetune"
            print(
                f"{what}: held-out top-1 {metrics['acc']:.4f} on {len(val_set)} images; checkpoints "
                f"{Path(out_dir) / 'checkpoint.pt'} (last) and {Path(out_dir) / 'checkpoint_best.pt'} (best)"
            )

    run(command)


@main.command()
@click.option("--preset", type=click.Choice(list(PRESETS)), default="vit_mini", help="ViT width and depth")
@click.option("--img-size", type=POSITIVE, default=28, help="square side of the random images")
@click.option("--patch-size", type=POSITIVE, default=4, help="P")
@click.option("--in-chans", type=POSITIVE, default=1, help="image channels")
@click.option("--batch-size", type=POSITIVE, default=256, help="images per step")
@click.option(
    "--num-patches", type=COUNT, multiple=True, default=(0,),
    help="N (repeatable, for a sweep); 0: (H/P)(W/P) as the paper",
)
@click.option("--pairs", type=POSITIVE, multiple=True, default=(128,), help="K (repeatable, for a sweep)")
@click.option("--sampler", type=click.Choice(part.SAMPLERS), default="offgrid", help="as pretrain's")
@click.option("--head", type=click.Choice(part.HEADS), default="cross-attention", help=HEAD_HELP)
@click.option("--steps", type=POSITIVE, default=10, help="timed steps per configuration")
@click.option("--compile", "use_compile", is_flag=True, help="time the PART step under torch.compile")
@click.option(
    "--methods",
    is_flag=True,
    help="also time every other method's step (MAE, DropPos, MP3; defaults) beside PART's, interleaved",
)
@click.option(
    "--preflight",
    is_flag=True,
    help="before a multi-day run on a GPU node: every method eager and compiled, "
    "recompiles, graph breaks, peak memory, MFU, DDP replicas on 2+ GPUs (README: GPUs and clusters)",
)
def bench(
    preset, img_size, patch_size, in_chans, batch_size, num_patches, pairs, sampler, head, steps, use_compile, methods,
    preflight,
):
    """Time a PART pretraining step beside a bare ViT step on this device: images/s, their ratio,
    the sampler's share, GFLOP, peak memory and MFU on CUDA; a sweep over N and K with repeated flags."""
    vit = vit_config(preset, patch_size=patch_size, in_chans=in_chans)
    if preflight:
        benchmark.preflight(vit, (img_size, img_size), batch_size, steps, pairs[0])
        return
    benchmark.bench(
        vit, (img_size, img_size), batch_size, num_patches, pairs, sampler, head, steps, use_compile, methods
    )


@main.command()
@click.option(
    "--ckpt", default=weights.DEFAULT_INIT,
    help="a checkpoint of train.py pretrain / finetune or sleep1d.py pretrain / finetune",
)
@click.option("--out-dir", default="out/export", help="gets encoder.pt (timm's names) and encoder.json (its config)")
def export(ckpt, out_dir):
    """Write the encoder's weights alone, loadable into timm's VisionTransformer, and its config beside
    them, so that `--init OUT_DIR/encoder.pt` needs no other flag (README)."""
    weights.export(ckpt, out_dir)


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out-dir", required=True, help="the repeat's folder (a new one: the same folder would resume the run)")
def rerun(run_dir, out_dir):
    """Repeat the run recorded in RUN_DIR/run.json: its first command (train.py, sleep1d.py or detect.py, any
    flags) with --out-dir replaced, in this checkout; the same seed gives the same weights on CPU."""
    path = Path(run_dir) / "run.json"
    try:
        record = json.loads(path.read_text())
        first, world = record["starts"][0], record["recipe"]["world_size"]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        fail(f"{path} is not a run.json of ours ({type(e).__name__}: {e}): no command to repeat")
    command = [*first["argv"], "--out-dir", out_dir]  # click takes an option's last value
    if world > 1:
        fail(f"{path} ran on {world} processes: repeat it as torchrun --nproc_per_node={world} {' '.join(command)}")
    print(f"repeating {' '.join(command)} (commit {first.get('commit', '?')[:10]}, this checkout's code)")
    sys.exit(subprocess.call([sys.executable, *command], cwd=Path(__file__).parent))


@main.command()
@click.argument("out_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", default="curves.png", help="the PNG to write")
def plot(out_dirs, out):
    """Loss, lr and held-out metrics of one or several runs (their log.jsonl) against the step, in one PNG."""
    import figures  # matplotlib: loaded by the drawing commands alone

    try:
        figures.plot_runs(out_dirs, out)
    except ValueError as e:
        fail(str(e))
    print(f"wrote {out}: {len(out_dirs)} run(s)")


# ---------------------------------------------------------------- show: what PART learned (section 5.1)


def load_part(path):
    """The PART model of a pretraining checkpoint, in eval mode, and the run's config."""
    ckpt, config = weights.read_checkpoint(path, ("part",))
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
    return data.read_image(path, "L" if chans == 1 else "RGB", size)


def held_out_images(config, cfg, data_dir, indices):
    """[(name, uint8 (C, H, W))] from the validation split of the checkpoint's dataset."""
    name = config.get("data")
    if not name:
        fail("the checkpoint records no dataset: pass --image")
    try:
        info = data.data_info(name, cfg.img_size[0], cfg.vit.in_chans)
        val_set = data.build_dataset(name, data_dir, "val", info, data.eval_transform(info, name))
    except UserError as e:
        fail(f"{e} (or pass --image)")
    for i in indices:
        if not 0 <= i < len(val_set):
            fail(f"--index {i} is outside the {len(val_set)} held-out images of {name}")
    return [(f"{name}_val{i}", val_set[i][0]) for i in indices]


@main.command()
@click.option("--ckpt", default=weights.DEFAULT_INIT, help="a PART pretraining checkpoint")
@click.option(
    "--image", "image_paths", multiple=True,
    help="an image file (repeatable); default: held-out images of the checkpoint's dataset",
)
@click.option(
    "--index", "indices", type=COUNT, multiple=True, default=(0,),
    help="held-out image(s) shown without --image",
)
@click.option(
    "--data-dir",
    default=None,
    help="the checkpoint's dataset, for held-out images (fashion-mnist falls back to Debian's package)",
)
@click.option("--ref", type=int, default=-1, help="reference patch of Figure 4; -1: the one nearest the image centre")
@click.option("--target", type=int, default=-1, help="target patch of Figure 5; -1: the most and the least certain")
@click.option("--seed", type=int, default=0, help="seeds the patch sampler and the shuffled order")
@click.option("--out-dir", default="out/show", help="gets the figures and their numbers")
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


@torch.no_grad()
def knn_features(encoder, mean, std, pool, dataset, dd, batch_size=512):
    """A frozen encoder's features of the on-grid patches, as its checkpoint was trained (position
    embeddings if it has them): the class token (pool "cls") or the mean of the patch tokens ("avg"),
    L2-normalised, on dd.device -> (n, D), labels (n,)."""
    feats, labels = [], []
    normalize = part.Normalize(mean, std).to(dd.device)
    for images, y in progress(make_loader(dataset, batch_size, dd, 0, -1, False), dd, desc="features"):
        with autocast(dd.device):
            tokens = part.encode_grid(encoder, normalize, images.to(dd.device, non_blocking=True))  # (B, T, D)
        pooled = encoder.pool(tokens, pool)  # (B, D)
        feats.append(F.normalize(pooled.float(), dim=-1))
        labels.append(y.to(dd.device))
    return torch.cat(feats), torch.cat(labels)


@main.command()
@click.option(
    "--ckpt", default=weights.DEFAULT_INIT,
    help="a PART checkpoint, a finetuned classifier or an export of either",
)
@click.option(
    "--data", "data_name", type=click.Choice(list(data.DATASETS)), default=None,
    help="the dataset; default: the checkpoint's (a foreign state dict has none)",
)
@click.option(
    "--data-dir", default=None, help="the checkpoint's dataset (fashion-mnist falls back to Debian's package)"
)
@click.option(
    "--pool", type=click.Choice(part.POOLS), default="avg",
    help="avg: the patch tokens' mean (PART trains no class token); cls: a finetuned model's class token",
)
@click.option("--k", type=POSITIVE, default=20, help="neighbours (DINO: 20)")
@click.option(
    "--temperature", type=Finite(min=0, min_open=True), default=0.07,
    help="a vote weighs exp(cosine / T) (DINO: 0.07)",
)
@click.option("--random-init", is_flag=True, help="the checkpoint's encoder with fresh random weights: the baseline")
def knn(ckpt, data_name, data_dir, pool, k, temperature, random_init):
    """Weighted kNN top-1 (DINO) of the frozen encoder's features: training images vote for held-out ones."""
    torch.manual_seed(0)  # the random baseline's weights
    encoder, model, name = weights.frozen_encoder(ckpt, random_init, data_name)
    if pool == "cls" and encoder.cls_token is None:
        fail(f"--pool cls: {ckpt} has no class token (PART pretrains without one); use --pool avg")
    if not name:
        fail(f"{ckpt} records no dataset")
    flags = dict(
        data_name=name, data_dir=data_dir, img_size=model["img_size"][0], in_chans=encoder.cfg.in_chans,
        mean=model["mean"], std=model["std"], train_subset=0, skip_bad_files=False,
    )
    info, train_set, val_set = load_sets(flags, data.eval_transform, data.eval_transform)
    count_classes(name, info, train_set)  # stops on unlabelled data
    if k > len(train_set):
        fail(f"--k {k}: expected 1 to the {len(train_set)} training images")
    if int(os.environ.get("RANK", 0)):  # under torchrun the job is one process's: rank 0 runs it, the others leave
        return
    dd = Dist(0, 0, 1, local_device())
    encoder.to(dd.device)
    bank, bank_labels = knn_features(encoder, model["mean"], model["std"], pool, train_set, dd)
    queries, labels = knn_features(encoder, model["mean"], model["std"], pool, val_set, dd)
    acc = (part.knn_predict(bank, bank_labels, queries, k, temperature) == labels).float().mean().item()
    print(
        f"kNN top-1 {acc:.4f}: {len(val_set)} held-out {name} images, {len(train_set)} training images vote, "
        f"k {k}, T {temperature}, pool {pool}, {'random' if random_init else 'pretrained'} encoder of {ckpt}"
    )


if __name__ == "__main__":
    main()
