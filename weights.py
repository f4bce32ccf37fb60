"""Weights in and out: reading a checkpoint of ours or a foreign state dict, the starting weights of --init,
position embeddings resized to a new grid, and the export (encoder.pt + encoder.json for --init, and
config.json + model.safetensors in the layout of timm's hub exports).

    python train.py export --ckpt out/pretrain/checkpoint.pt        # -> out/export
    model = timm.create_model("local-dir:out/export", pretrained=True)
"""

import json
import math
import os
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import torch

import baselines
import data
from engine import UserError, fail, load_checkpoint, save_checkpoint, write_atomic
from vit import PRESETS, ViTConfig, VisionTransformer, resize_pos_embed

DEFAULT_INIT = "out/pretrain/checkpoint.pt"  # where `train.py pretrain` writes by default
KINDS = {  # what a checkpoint's config "kind" says it is
    **{
        m + suffix: f"a {model.__name__} {d}D pretraining checkpoint ({script} pretrain --method {m})"
        for suffix, d, script in (("", 2, "train.py"), ("1d", 1, "sleep1d.py"))
        for m, (_, model) in baselines.METHODS.items()
    },
    "classifier": "an image classifier (train.py finetune)",
    "sleep-stager": "a sleep stager (sleep1d.py finetune)",
    "detect": "a detector (detect.py)",
    "encoder": "an exported encoder (train.py export)",
}
ENCODER_KINDS = {  # starting weights, by patch_ndim
    2: (*baselines.METHODS, "classifier", "encoder"),
    1: (*(f"{m}1d" for m in baselines.METHODS), "sleep-stager", "encoder"),
}
EXPORTABLE = (*ENCODER_KINDS[2][:-1], *ENCODER_KINDS[1][:-1])  # every kind that holds an encoder, but an export


# ---------------------------------------------------------------- reading checkpoints


def read_checkpoint(path, kinds, foreign=False):
    """A checkpoint of one of `kinds` (config kinds) with its weights under "model" -> (checkpoint, its config,
    or an export's encoder.json beside it); foreign: any state dict of no kind of ours too (timm's), config {}.
    Why: a wrong file stops with one line that says what it is, never half-loaded."""
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict):
        fail(f"{path} holds a {type(ckpt).__name__}, not a checkpoint or a state dict")
    beside = Path(path).with_suffix(".json")
    config = ckpt.get("config")
    if beside.is_file():
        try:
            config = json.loads(beside.read_text())
        except json.JSONDecodeError as e:
            fail(f"{beside} is not the JSON that train.py export writes ({e})")
    config = config if isinstance(config, dict) else {}
    kind = config.get("kind")
    if kind not in kinds and not (foreign and kind is None):
        no_kind = "not a checkpoint of this project (its config names no kind)"
        got = KINDS.get(kind, f"a checkpoint of kind {kind!r}" if kind else no_kind)
        fail(f"{path} is {got}; expected " + " or ".join(KINDS[k] for k in kinds))
    if not foreign and "model" not in ckpt:
        fail(f"{path} holds no weights under 'model': expected the checkpoint.pt of a training run")
    return ckpt, config


def encoder_state_dict(checkpoint):
    """The encoder's weights in timm's names from a training dict, {"state_dict": ...} or a bare state dict;
    of a pretraining model the pretext parts go, but its fixed position embeddings (MAE's, DropPos', PART
    --pos-mask's) stay as pos_embed (1, [1 +] N, D), a class token's zero slot first as in their code."""
    state = checkpoint.get("model", checkpoint.get("state_dict", checkpoint))
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    if not any(k.startswith("encoder.") for k in state):
        return state
    encoder = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    if "fixed_pos_embed" in state:
        fixed = state["fixed_pos_embed"]  # (1, N, D)
        encoder["pos_embed"] = baselines.class_slot(fixed) if "cls_token" in encoder else fixed
    return encoder


def vit_of_state(state, fallback):
    """The ViTConfig of a foreign encoder state dict (timm's names), as far as its shapes tell; the heads, which
    no shape tells, from a preset of that width and depth, else width / 64 (timm's); the rest from `fallback`."""
    weight = state["patch_embed.proj.weight"]  # (D, C, P, P), or (D, C, P) for windows
    D, C, P = weight.shape[0], weight.shape[1], weight.shape[-1]
    depth = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("blocks.")), default=-1)
    hidden = state["blocks.0.mlp.fc1.weight"].shape[0] if depth else 4 * D
    preset_heads = {(p["embed_dim"], p["depth"]): p["num_heads"] for p in PRESETS.values()}
    heads = preset_heads.get((D, depth), max(1, D // 64))
    return replace(
        fallback, embed_dim=D, depth=depth, num_heads=heads, mlp_ratio=hidden / D, in_chans=C, patch_size=P,
        patch_ndim=weight.ndim - 2,
    )


# ---------------------------------------------------------------- starting weights (--init)


def pretrained_encoder(path, patch_ndim=2):
    """(encoder weights in timm's names, the checkpoint's config or {} for a foreign state dict); stops with
    one line when the file is missing or holds no `patch_ndim`-D encoder to start from."""
    if not Path(path).is_file():
        script = "train.py" if patch_ndim == 2 else "sleep1d.py"
        fail(f"{path} not found: finetuning starts from a PART checkpoint; run `python {script} pretrain` first, or "
             "pass --init PATH, or --init scratch for the supervised baseline")
    ckpt, config = read_checkpoint(path, ENCODER_KINDS[patch_ndim], foreign=True)
    ndim = config.get("model", {}).get("vit", {}).get("patch_ndim", patch_ndim)
    if ndim != patch_ndim:  # an export of the other kind of ViT
        fail(f"{path} is an encoder of a {ndim}D ViT; this command starts from one of a {patch_ndim}D ViT")
    return encoder_state_dict(ckpt), config


def encoder_from_init(init, fallback, patch_ndim=2):
    """--init -> (the encoder's ViTConfig, its weights or None, the checkpoint's config) for finetune, detect.py
    and sleep1d.py alike: scratch is `fallback` without weights; ours bring their own ViT; a foreign state dict
    the ViT its shapes tell."""
    if init == "scratch":
        return fallback, None, {}
    state, config = pretrained_encoder(init, patch_ndim)
    vit = config.get("model", {}).get("vit")
    if vit:
        return ViTConfig(**vit), state, config
    if "patch_embed.proj.weight" not in state:
        fail(f"{init} is neither a checkpoint of ours nor an encoder state dict (it has no patch_embed.proj.weight)")
    return vit_of_state(state, fallback), state, config


def resize_positions(pos_embed, source, encoder):
    """A pretrained position embedding (1, prefix + prod(old grid), D) for `encoder`'s grid and class token
    -> (embedding, what was done, in words). The old grid is the source model config's pos_grid (a finetuned
    model's), else its inputs' on-grid patches (MAE's, DropPos' fixed embeddings); a class slot the embedding
    lacks is the encoder's own, one the encoder lacks (a detector) is dropped."""
    vit = source["vit"]
    old_grid = tuple(vit.get("pos_grid") or (s // vit["patch_size"] for s in source["img_size"]))
    new_grid = tuple(encoder.cfg.pos_grid)
    prefix = pos_embed.shape[1] - math.prod(old_grid)
    pos = resize_pos_embed(pos_embed, old_grid, new_grid, prefix)
    own_prefix = int(encoder.cfg.class_token)
    if prefix == 0 and own_prefix:
        pos = torch.cat([encoder.pos_embed[:, :1].detach(), pos], dim=1)
    if prefix and not own_prefix:
        pos = pos[:, prefix:]
    grids = " -> ".join("x".join(map(str, grid)) for grid in (old_grid, new_grid))
    how = "kept" if old_grid == new_grid else f"interpolated {grids}"
    return pos, f"pos_embed {how}" + (", class token's slot new" if prefix == 0 and own_prefix else "")


def load_encoder(encoder, state, source=None, path="checkpoint", main=False):
    """Encoder weights into `encoder`, the ViT of a classifier, sleep stager or detector (source: the
    checkpoint's model config) -> (keys left at init, keys ignored), printed when `main`. Class token, head and
    position embeddings start fresh unless `state` brings them (positions resized to the new grid); every other
    weight must come from `state` in shape, or it stops."""
    state, note = dict(state), ""
    if "pos_embed" in state and encoder.pos_embed is not None and source and source.get("vit"):
        state["pos_embed"], note = resize_positions(state["pos_embed"], source, encoder)
    own = encoder.state_dict()
    fresh = [k for k in own if k in ("cls_token", "pos_embed") or k.startswith(("head.", "fc_norm."))]
    state = {k: v for k, v in state.items() if k not in fresh or v.shape == own[k].shape}  # else left at init
    missing = [k for k in own if k not in state and k not in fresh]
    if missing:
        more = " ..." if len(missing) > 5 else ""
        raise UserError(f"{path} lacks encoder weights {missing[:5]}{more}: not a PART/ViT checkpoint?")
    wrong = [k for k, v in own.items() if k in state and state[k].shape != v.shape]
    if wrong:
        shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong[:3]]
        raise UserError(f"{path} is of another size (preset, patch size or channels): {shapes}")
    unexpected = [k for k in state if k not in own]
    encoder.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    fresh = [k for k in fresh if k not in state]
    if main:
        print(f"encoder from {path}; {note + '; ' if note else ''}new: {', '.join(fresh) or 'none'}; ignored: "
              f"{', '.join(unexpected) or 'none'}")
    return fresh, unexpected


def foreign_model(path, state, data_name):
    """The model config of a foreign state dict (no config of ours): the ViT its shapes tell, a class token if
    it has one, its position embeddings' square grid, and the inputs of --data."""
    if not data_name:
        fail(f"{path} is a state dict without our config: pass --data, the dataset its features vote on")
    prefix = int("cls_token" in state)
    vit = replace(vit_of_state(state, ViTConfig()), class_token=bool(prefix))
    if "pos_embed" in state:
        vit = replace(vit, pos_grid=(math.isqrt(state["pos_embed"].shape[1] - prefix),) * 2)
    info = data.data_info(data_name, in_chans=vit.in_chans)
    return {"vit": asdict(vit), "img_size": [info.img_size] * 2, "mean": info.mean, "std": info.std}


def frozen_encoder(path, random_init, data_name=None):
    """kNN's 2D encoder in eval mode, from a checkpoint, an export or a foreign state dict (then of --data's
    inputs), with the position embeddings it was trained with -> (encoder, its model config, data name).
    random_init: its architecture with fresh weights and no positions, the baseline."""
    state, config = pretrained_encoder(path)
    model = config.get("model") or foreign_model(path, state, data_name)
    vit = replace(ViTConfig(**model["vit"]), num_classes=0)
    name = data_name or config.get("data")
    grid = tuple(s // vit.patch_size for s in model["img_size"]) if "pos_embed" in state and not random_init else ()
    encoder = VisionTransformer(replace(vit, pos_grid=grid))
    if not random_init:
        load_encoder(encoder, state, model, path)
    return encoder.eval(), model, name


# ---------------------------------------------------------------- export

TIMM_ARCHITECTURES = {  # the timm model function named for each preset of the same size
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_s": "vit_small_patch16_224",
    "vit_b": "vit_base_patch16_224",
    "vit_l": "vit_large_patch16_224",
}
PHOTOS = ("in1k", "imagefolder", "images")  # data.eval_transform's DeiT centre crop (crop_pct 0.875)
PROBE_EPS = 1e-6  # the eps of part.Classifier's linear-probe BatchNorm
EXPORT_FILES = {"encoder.pt", "encoder.json", "config.json", "model.safetensors"}


def export(ckpt, out_dir):
    """A checkpoint's encoder alone to out_dir: encoder.pt with its config in encoder.json, so that
    `--init OUT_DIR/encoder.pt` needs no other flag, and the same weights for timm."""
    checkpoint, config = read_checkpoint(ckpt, EXPORTABLE)
    kind, model, state = config["kind"], config["model"], encoder_state_dict(checkpoint)
    meta = {
        "kind": "encoder",
        "source": str(ckpt),
        "source_kind": kind,
        "data": config.get("data"),
        "model": {k: model[k] for k in ("vit", "img_size", "mean", "std") if k in model},
    }
    out = Path(out_dir)
    if out.exists() and not (out.is_dir() and {p.name for p in out.iterdir()} <= EXPORT_FILES):
        fail(f"--out-dir {out} holds more than an export ({', '.join(sorted(EXPORT_FILES))}): pass a new folder")
    building = out.with_name(f"{out.name}.{os.getpid()}.tmp")  # renamed whole: a kill leaves the old export or none
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    save_checkpoint(building / "encoder.pt", state)
    write_atomic(building / "encoder.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))
    timm = write_timm_export(building, state, model, kind, config.get("data"))
    stale = out.with_name(f"{out.name}.{os.getpid()}.old")  # the old export, removed once the new one is in place
    if out.exists():
        os.replace(out, stale)
    os.replace(building, out)
    shutil.rmtree(stale, ignore_errors=True)
    print(f"wrote {len(state)} tensors to {out / 'encoder.pt'} and their config to {out / 'encoder.json'}")
    print(timm.replace(str(building), str(out)))


def write_timm_export(out_dir, state, model_config, kind, data_name):
    """config.json and model.safetensors of encoder weights `state` -> one line that says what was written, or
    why nothing was (a 1D model). config.json comes last: a folder that has it is complete."""
    from safetensors.torch import save_file  # loaded by export alone

    try:
        config = timm_config(model_config, kind, data_name, "pos_embed" in state)
    except ValueError as e:
        return f"no timm export: {e}"
    if kind == "classifier" and model_config["linear_probe"]:
        state = fold_probe_head(state)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    write_atomic(out / "model.safetensors", lambda tmp: save_file(tensors, tmp))
    write_atomic(out / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2)))
    return (
        f"wrote {out / 'config.json'} and {out / 'model.safetensors'}: "
        f"timm.create_model('local-dir:{out}', pretrained=True)"
    )


def timm_config(model_config, kind, data_name, positions):
    """timm's config.json (what timm/models/_hub.py reads) for a model of `kind` (a pretraining method or
    classifier) with `model_config`, trained on `data_name`, with or without positions; ValueError for 1D."""
    vit = model_config["vit"]
    if vit["patch_ndim"] != 2:
        raise ValueError(f"timm has no {vit['patch_ndim']}D ViT (its vision_transformer takes images)")
    args = timm_model_args(model_config, kind, positions)
    what = "finetuned classifier" if kind == "classifier" else f"{kind} pretrained encoder"
    pretrained_cfg = {  # only fields of timm's PretrainedCfg: create_model raises TypeError on any other
        "input_size": [args["in_chans"], *args["img_size"]],  # (C, H, W)
        "fixed_input_size": True,  # position embeddings and patch embedding are for this size
        "interpolation": "bicubic",  # data.eval_transform resizes bicubic (MAE, DeiT)
        "crop_pct": 0.875 if data_name in PHOTOS else 1.0,
        "crop_mode": "center",
        "mean": list(model_config["mean"]),
        "std": list(model_config["std"]),
        "num_classes": args["num_classes"],
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "description": f"{what}{f' on {data_name}' if data_name else ''}, PART reference implementation "
        "(train.py export)",
    }
    return {
        "architecture": timm_architecture(vit),
        "num_classes": args["num_classes"],
        "num_features": args["embed_dim"],
        "global_pool": args["global_pool"],
        "model_args": args,
        "pretrained_cfg": pretrained_cfg,
    }


def timm_architecture(vit):
    """timm's ViT of the same width, depth and heads, else ViT-B's: model_args override all its sizes, so
    any would do; the name tells the size."""
    size = {k: vit[k] for k in ("embed_dim", "depth", "num_heads")}
    same = [name for preset, name in TIMM_ARCHITECTURES.items() if PRESETS[preset] == size]
    return same[0] if same else TIMM_ARCHITECTURES["vit_b"]


def timm_model_args(model_config, kind, positions):
    """Keyword arguments of timm's VisionTransformer whose forward is ours. The rest of timm's defaults are
    ours too: LayerNorm eps 1e-6, exact GELU, no layer scale, fused attention at head_dim^-0.5."""
    vit = model_config["vit"]
    if kind == "classifier":  # a class token, learnt position embeddings unless a probe has none, a linear head
        class_token, num_classes = True, vit["num_classes"]
        global_pool = {"cls": "token", "avg": "avg"}[vit["pool"]]
    else:  # the bare encoder (a class token only if it pretrained one); its features are the mean of the patch tokens
        class_token, num_classes, global_pool = vit["class_token"], 0, "avg"
    return dict(
        img_size=list(model_config["img_size"]),
        patch_size=vit["patch_size"],
        in_chans=vit["in_chans"],
        embed_dim=vit["embed_dim"],
        depth=vit["depth"],
        num_heads=vit["num_heads"],
        mlp_ratio=vit["mlp_ratio"],
        qkv_bias=True,
        class_token=class_token,
        pos_embed="learn" if positions else "none",
        no_embed_class=False,  # a class token's position slot is first, added after it is prepended (ours)
        global_pool=global_pool,
        fc_norm=False,  # the final norm before pooling, not after it
        num_classes=num_classes,
    )


def fold_probe_head(state, eps=PROBE_EPS):
    """A linear probe's head, BatchNorm without affine (head.0) then Linear (head.1), as the one Linear timm's
    head is: in eval W BN(x) + b = (W s) x + (b - (W s) mean) with s = 1 / sqrt(var + eps)."""
    scale = (state["head.0.running_var"] + eps).rsqrt()  # (D,)
    weight = state["head.1.weight"] * scale  # (classes, D), column d scaled by s_d
    bias = state["head.1.bias"] - weight @ state["head.0.running_mean"]  # (classes,)
    return {**{k: v for k, v in state.items() if not k.startswith("head.")}, "head.weight": weight, "head.bias": bias}
