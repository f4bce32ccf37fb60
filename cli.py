"""What the three command-line programs (train.py, sleep1d.py, detect.py) share: the one-line error layer
and the option groups (recipe, method); their weights in and out are weights.py's.
No entry point imports another; they all import this.
"""

import dataclasses
import json
import math
import pickle
import traceback
import zipfile
from dataclasses import asdict
from pathlib import Path

import click
from click.core import ParameterSource

import baselines
import part
from engine import Recipe, UserError, fail


class Finite(click.FloatRange):
    """A float flag that refuses NaN and the infinities (click's FloatRange lets NaN through every bound)."""

    name = "float"

    def _describe_range(self):  # --help's "[0<=x<1]"; nothing for a flag unbounded but finite
        return super()._describe_range() if self.min is not None or self.max is not None else ""

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if not math.isfinite(value):
            self.fail(f"{value} is not a finite number", param, ctx)
        return value


def options(*decorators, section=None):
    """Apply click options so that --help lists them in the order given, under `section` (SectionedCommand)."""

    def apply(f):
        for decorate in reversed(decorators):
            f = decorate(f)
        for param in f.__click_params__[-len(decorators) :]:  # click collects them there until the command is made
            param.section = section
        return f

    return apply


class SectionedCommand(click.Command):
    """--help lists the options in sections (data, model, method, recipe, then the command's own), as timm's do."""

    def format_options(self, ctx, formatter):
        sections = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record:
                sections.setdefault(getattr(param, "section", None) or "options", []).append(record)
        for name, records in sections.items():
            with formatter.section(name.capitalize()):
                formatter.write_dl(records)


# what reading a file raises beyond our own errors: the OS's (gzip's, PIL's), a file cut short, torch.save's format
FILE_ERRORS = (OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, json.JSONDecodeError)


class Cli(click.Group):
    """The commands of train.py, sleep1d.py and detect.py: our own errors (a bad setting, bad data, a run
    that cannot go on) and what a file can throw stop them with one line instead of a traceback; anything
    else is a bug, shown with its traceback and a line that says so. Their --help lists options in sections,
    with their defaults."""

    command_class = SectionedCommand

    def __init__(self, *args, **kwargs):
        super().__init__(*args, context_settings={"show_default": True}, **kwargs)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except UserError as e:
            # re-raised from a loader worker, the message ends with the original exception's own line
            message = str(e).strip().splitlines()[-1].removeprefix(f"{type(e).__module__}.{type(e).__name__}: ")
            raise click.ClickException(message) from None
        except FILE_ERRORS as e:
            raise click.ClickException(file_error(e)) from None
        except Exception:
            traceback.print_exc()
            raise click.ClickException(
                "the traceback above is a bug in PART, not a fault of your input: please report it "
                "with the command that ran"
            ) from None


def file_error(e):
    """One line for what reading or writing a file raised, naming the file where the exception knows it."""
    name = getattr(e, "filename", None)
    text = str(e).strip()
    what = getattr(e, "strerror", None) or (text.splitlines()[0] if text else type(e).__name__)
    return f"{name}: {what}" if name else f"a file could not be read or written ({type(e).__name__}: {what})"


class CommaList(click.ParamType):
    """A comma-separated list of `item`s: "8,11" -> (8.0, 11.0) for float, "" -> ()."""

    name = "list"

    def __init__(self, item):
        self.item = item

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            return tuple(self.item(v) for v in value.split(",") if v.strip())
        except ValueError:
            self.fail(f"{value!r}: expected comma-separated {self.item.__name__} values, e.g. 8,11", param, ctx)


POSITIVE, COUNT, NON_NEGATIVE = click.IntRange(min=1), click.IntRange(min=0), Finite(min=0)
SHARE = Finite(0, 1, max_open=True)
OUT_DIR_HELP = "gets checkpoint.pt, log.jsonl (and checkpoint_best.pt); a run resumes from its own"
XAVIER_HELP = (
    "every Linear xavier-uniform, MAE's and DropPos' official init (theirs always), in place of DeiT's trunc-normal "
    "0.02: the same init for every row of a comparison"
)
HEAD_HELP = "relative encoder (Table 5), each as the paper writes it"
RECIPE_FLAGS = {  # Recipe field: (click type, help)
    "epochs": (POSITIVE, "training epochs"),
    "batch_size": (POSITIVE, "images per process and step"),
    "accum": (POSITIVE, "gradient accumulation: micro-batches per optimizer step"),
    "blr": (Finite(min=0, min_open=True), "base learning rate: lr = blr x effective batch / 256 (printed at start)"),
    "lr": (NON_NEGATIVE, "the peak lr itself, overriding --blr (MAE's --lr); 0: from --blr"),
    "min_lr": (NON_NEGATIVE, "the cosine schedule's last lr"),
    "warmup_epochs": (NON_NEGATIVE, "linear lr warmup, in epochs (fractions allowed)"),
    "weight_decay": (NON_NEGATIVE, "AdamW's, not on norms, biases, tokens and position embeddings"),
    "layer_decay": (
        Finite(min=0, max=1, min_open=True), "layer-wise lr decay: block i's lr x decay^(depth + 1 - i); 1: off"
    ),
    "beta2": (Finite(min=0, max=1, max_open=True), "AdamW's beta2: 0.95 pretraining (MAE), 0.999 finetuning (DeiT)"),
    "clip_grad": (NON_NEGATIVE, "max gradient norm; 0: no clipping"),
    "workers": (click.IntRange(min=-1), "data-loader workers per process; -1: 8 on CUDA, 0 on CPU"),
    "seed": (click.IntRange(0, 2**32 - 1), "seeds weights, sampling and data order: the same seed repeats a run"),
    "compile": (bool, "torch.compile the model"),
    "grad_ckpt": (bool, "activation checkpointing in the ViT blocks: less memory, ~1/3 more compute, same gradients"),
    "log_every": (POSITIVE, "optimizer steps between log.jsonl lines"),
    "save_every_min": (
        NON_NEGATIVE,
        "also checkpoint within an epoch every M minutes, bounding what a kill loses; "
        "0: at epoch ends (and at SIGINT / SIGTERM) only",
    ),
    "lr_drops": (CommaList(float), "a step schedule instead of cosine: epochs where the lr drops x0.1, e.g. 8,11"),
    "resume_changed": (
        bool, "resume the run in --out-dir with the recipe given now where it differs from its checkpoint's"
    ),
    "tensorboard": (bool, "also log.jsonl's rows as TensorBoard events in OUT_DIR/tensorboard (needs tensorboard)"),
}


def recipe_options(**defaults):
    """The Recipe's fields as click options, with per-command defaults, in the Recipe's order."""
    flags = []
    for name, default in {**asdict(Recipe()), **defaults}.items():
        kind, text = RECIPE_FLAGS[name]
        how = {"is_flag": True} if kind is bool else {"type": kind}
        flags.append(click.option("--" + name.replace("_", "-"), **how, default=default, help=text))
    return options(*flags, section="recipe")


def take(kwargs, names):
    """The values of `names` popped out of a command's kwargs."""
    return {k: kwargs.pop(k) for k in names}


def recipe_from(kwargs):
    return Recipe(**take(kwargs, asdict(Recipe())))


BASELINE_OPTIONS = (  # the flags of MAE, DropPos and MP3, each naming the methods it is for
    click.option(
        "--mask-ratio", type=SHARE, default=0.75,
        help="mae, droppos: share of patches hidden from the encoder; mp3: share that gives no keys and values "
             "(its eta)",
    ),
    click.option(
        "--pos-mask-ratio", type=SHARE, default=0.75,
        help="droppos: share of the visible patches whose position embedding is dropped",
    ),
    click.option(
        "--decoder-dim", type=POSITIVE, default=128,
        help="mae, droppos: decoder width, CPU-sized (the official code: 512, 16 heads)",
    ),
    click.option("--decoder-depth", type=POSITIVE, default=2, help="mae, droppos: decoder blocks (MAE: 8, DropPos: 2)"),
    click.option(
        "--class-token", is_flag=True,
        help="mae, droppos: a class token through encoder and decoder, as their official code (default: none, as "
             "PART's encoder)",
    ),
    click.option(
        "--attentive", is_flag=True,
        help="droppos: attentive reconstruction, its --attn_guide (a second encoder pass); needs --class-token",
    ),
    click.option(
        "--sigma", type=NON_NEGATIVE, default=1.0,
        help="droppos: position smoothing in patches, (1 - epoch / epochs) sigma in each epoch (DropPos: 1)",
    ),
)


def method_options(pos_mask=0.0):
    """The pretraining method and its flags, one set for train.py and sleep1d.py (which differ in the
    default of --pos-mask); each flag names the methods it is for."""
    return options(
        click.option(
            "--method", type=click.Choice(list(baselines.METHODS)), default="part",
            help="part: the paper's; mae, droppos, mp3: the baselines of its Tables 1-3, on the same ViT",
        ),
        click.option(
            "--sampler", type=click.Choice(part.SAMPLERS), default="offgrid",
            help="part: offgrid the paper's; offgrid-scale also dw, dh (5.1 ii); grid: PART-grid (Table 4)",
        ),
        click.option("--head", type=click.Choice(part.HEADS), default="cross-attention", help="part: " + HEAD_HELP),
        click.option(
            "--pos-mask", type=SHARE, default=pos_mask,
            help="part: 0, no position information (section 4); >0: sin-cos positions for all but this share, "
                 "loss on pairs with a masked patch (README, the 1D readings)",
        ),
        *BASELINE_OPTIONS,
        section="method",
    )


def method_config(method, **fields):
    """baselines.pretext_config of `method` from a pretrain command's flags (the method_options, --num-patches,
    --pairs) and inputs; a flag given on the command line that the method does not take stops with one line."""
    ctx = click.get_current_context()
    taken = {m: {f.name for f in dataclasses.fields(config)} for m, (config, _) in baselines.METHODS.items()}
    for param in ctx.command.params:
        given = param.name in fields and ctx.get_parameter_source(param.name) == ParameterSource.COMMANDLINE
        if given and param.name not in taken[method]:
            takers = [m for m in taken if param.name in taken[m]]
            fail(f"{param.opts[0]} is not a flag of --method {method}: it is for {', '.join(takers)}")
    return baselines.pretext_config(method, **fields)


def pretrain_summary(method, metrics, out_dir, signals=False):
    """The line a pretraining run ends on: its held-out metric (PART's: its error as a share of the zero predictor's)
    and its checkpoint; for signals (sleep1d.py), a PART no better than no shift points to --pos-mask."""
    if not metrics:  # another rank, or nothing was evaluated
        return None
    where = f"checkpoint {Path(out_dir) / 'checkpoint.pt'}"
    if metrics.get("euclid_zero"):
        ratio = metrics["euclid"] / metrics["euclid_zero"]
        hint = ""
        if signals and ratio > 0.99:
            hint = ("; no better than predicting no shift: 1-s windows without positions may leave nothing to learn "
                    "(README, the 1D readings; try --pos-mask 0.2)")
        return (
            f"{method}: held-out error {ratio:.3f} x the zero predictor's ({metrics['euclid']:.3f} / "
            f"{metrics['euclid_zero']:.3f} patch sizes){hint}; {where}"
        )
    if "pos_acc" in metrics:
        return f"{method}: held-out position accuracy {metrics['pos_acc']:.3f}, loss {metrics['loss']:.4f}; {where}"
    return f"{method}: held-out loss {metrics['loss']:.4f}; {where}"
