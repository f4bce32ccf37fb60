"""What the three command-line programs (train.py, sleep1d.py, detect.py) share: the one-line error layer,
the option groups (recipe, method) and starting weights from --init (checkpoint kinds, encoder loading).
No entry point imports another; they all import this.
"""
import json
from dataclasses import asdict, replace
from pathlib import Path

import click

import baselines
import data
import part
from engine import Recipe, RunError, fail, load_checkpoint


# ---------------------------------------------------------------- the error layer and option groups

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
    "beta2": (click.FloatRange(min=0, max=1, max_open=True), "AdamW's beta2: 0.95 pretraining (MAE), 0.999 finetuning (DeiT)"),
    "clip_grad": (NON_NEGATIVE, "max gradient norm; 0: no clipping"),
    "workers": (click.IntRange(min=-1), "data-loader workers per process; -1: 8 on CUDA, 0 on CPU"),
    "seed": (int, "seeds weights, sampling and data order: the same seed repeats a run"),
    "compile": (bool, "torch.compile the model"),
    "grad_ckpt": (bool, "activation checkpointing in the ViT blocks: less memory, ~1/3 more compute, same gradients"),
    "log_every": (POSITIVE, "optimizer steps between log.jsonl lines"),
    "save_every_min": (NON_NEGATIVE, "also checkpoint within an epoch every M minutes, bounding what a kill loses; "
                                     "0: at epoch ends (and at SIGINT / SIGTERM) only"),
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



SHARE = click.FloatRange(0, 1, max_open=True)


def method_options(pos_mask=0.0):
    """The pretraining method and its flags, one set for train.py and sleep1d.py (which differ in the
    default of --pos-mask); each flag names the methods it is for."""
    return options(
        click.option("--method", type=click.Choice(list(baselines.METHODS)), default="part", show_default=True,
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



# ---------------------------------------------------------------- starting weights (--init)

DEFAULT_INIT = "out/pretrain/checkpoint.pt"  # where `pretrain` writes by default


KINDS = {  # what a checkpoint's config "kind" says it is
    **{m: f"a {model.__name__} 2D pretraining checkpoint (train.py pretrain --method {m})" for m, (_, model) in baselines.METHODS.items()},
    **{f"{m}1d": f"a {model.__name__} 1D pretraining checkpoint (sleep1d.py pretrain --method {m})" for m, (_, model) in baselines.METHODS.items()},
    "classifier": "an image classifier (train.py finetune)",
    "sleep-stager": "a sleep stager (sleep1d.py finetune)",
    "detect": "a detector (detect.py)",
    "encoder": "an exported encoder (train.py export)",
}
ENCODER_KINDS = {  # starting weights, by patch_ndim
    2: (*baselines.METHODS, "classifier", "encoder"),
    1: (*(f"{m}1d" for m in baselines.METHODS), "sleep-stager", "encoder"),
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
    if part.has_positions(state) and encoder.pos_embed is not None and source.get("vit"):
        state["pos_embed"], note = part.adapt_pos_embed(state["pos_embed"], source_grid(source), encoder)
    fresh, unexpected = part.load_encoder(encoder, state, path)
    if main:
        print(f"encoder from {path}; {note + '; ' if note else ''}new: {', '.join(fresh) or 'none'}; ignored: {', '.join(unexpected) or 'none'}")
