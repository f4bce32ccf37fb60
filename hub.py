"""Exports that timm loads natively (issue #23): a folder with `config.json` and `model.safetensors`
in the layout of timm's Hugging Face hub exports, so that

    model = timm.create_model("local-dir:out/export", pretrained=True)
    data_config = timm.data.resolve_data_config({}, model=model)  # input size, mean, std

rebuild a pretrained encoder (PART, MAE, DropPos) or a finetuned classifier with our outputs.
`python train.py export` writes them beside encoder.pt. The format is what timm's `save_config_for_hf`
writes and `_parse_model_cfg` reads (timm/models/_hub.py): the architecture (a registered timm model
function), model_args (keyword arguments that override its defaults), the pretrained_cfg (input and
preprocessing) and, for information, num_classes, num_features and global_pool.
"""

import json
import os
from pathlib import Path

from safetensors.torch import save_file

import part
from vit import PRESETS

# the timm model function named for each preset of the same size; model_args override all its sizes
TIMM_ARCHITECTURES = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_s": "vit_small_patch16_224",
    "vit_b": "vit_base_patch16_224",
}
PHOTOS = (
    "in1k",
    "imagefolder",
    "images",
)  # data.eval_transform's DeiT centre crop (crop_pct 0.875); other sets are resized only
PROBE_EPS = 1e-6  # the eps of part.Classifier's linear-probe BatchNorm


def timm_refusal(model_config):
    """Why timm cannot rebuild this model, or None when it can."""
    ndim = model_config["vit"]["patch_ndim"]
    return None if ndim == 2 else f"timm has no {ndim}D ViT (its vision_transformer takes images)"


def timm_architecture(vit):
    """The name of timm's ViT of the same width, depth and heads, else ViT-B's: it only supplies
    defaults that model_args override, so any would rebuild the model; the name tells its size."""
    size = {k: vit[k] for k in ("embed_dim", "depth", "num_heads")}
    return next(
        (name for preset, name in TIMM_ARCHITECTURES.items() if PRESETS[preset] == size),
        TIMM_ARCHITECTURES["vit_b"],
    )


def timm_model_args(model_config, kind, positions):
    """Keyword arguments of timm's VisionTransformer whose forward is ours. The rest of timm's defaults
    are ours too: LayerNorm eps 1e-6, exact GELU, no layer scale, fused attention at head_dim^-0.5.
    positions: the weights bring position embeddings (part.has_positions)."""
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


def timm_config(model_config, kind, data_name, positions):
    """timm's config.json for a model of `kind` (a checkpoint's config kind: a pretraining method or
    classifier) with `model_config` (the checkpoint's config["model"]), trained on `data_name`, whose
    weights bring position embeddings or not (`positions`)."""
    reason = timm_refusal(model_config)
    if reason:
        raise ValueError(reason)
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
        "description": f"{what}"
        + (f" on {data_name}" if data_name else "")
        + ", PART reference implementation (train.py export)",
    }
    return {
        "architecture": timm_architecture(model_config["vit"]),
        "num_classes": args["num_classes"],
        "num_features": args["embed_dim"],
        "global_pool": args["global_pool"],
        "model_args": args,
        "pretrained_cfg": pretrained_cfg,
    }


def fold_probe_head(state, eps=PROBE_EPS):
    """A linear probe's head, BatchNorm without affine (head.0) then Linear (head.1), as the one Linear
    that timm's head is. In eval the norm is x -> (x - mean) s with s = 1 / sqrt(var + eps), so
    W BN(x) + b = (W s) x + (b - (W s) mean)."""
    scale = (state["head.0.running_var"] + eps).rsqrt()  # (D,)
    weight = state["head.1.weight"] * scale  # (classes, D), column d scaled by s_d
    bias = state["head.1.bias"] - weight @ state["head.0.running_mean"]  # (classes,)
    return {**{k: v for k, v in state.items() if not k.startswith("head.")}, "head.weight": weight, "head.bias": bias}


def write_timm_export(out_dir, state, model_config, kind, data_name):
    """Write config.json and model.safetensors to out_dir, each through a temporary file and a rename.
    `state` is part.encoder_state_dict(checkpoint); the other arguments as for timm_config.
    -> one line that says what was written, or why nothing was (a 1D model)."""
    reason = timm_refusal(model_config)
    if reason:
        return f"no timm export: {reason}"
    config = timm_config(model_config, kind, data_name, part.has_positions(state))
    if kind == "classifier" and model_config["linear_probe"]:
        state = fold_probe_head(state)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights, config_path = out / "model.safetensors", out / "config.json"
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, f"{weights}.tmp")
    Path(f"{config_path}.tmp").write_text(json.dumps(config, indent=2))
    os.replace(f"{weights}.tmp", weights)
    os.replace(f"{config_path}.tmp", config_path)  # last: a folder with config.json is complete
    return f"wrote {config_path} and {weights}: timm.create_model('local-dir:{out}', pretrained=True)"
