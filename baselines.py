"""The baselines of the paper's Tables 1-3 on vit.py's ViT: MAE and DropPos (grid patches with position
embeddings), MP3 (without them); and METHODS, which `--method` chooses from. Each returns (loss, metrics) as PART
does; docs/comparison.md says where they differ from their official code.

    python train.py pretrain --method mae|droppos|mp3
"""

import dataclasses
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from part import (
    PART, UserError, InputConfig, Normalize, PARTConfig, as_mask, check_share, grid_positions, random_split,
)
from vit import Block, VisionTransformer, patchify, run_blocks, sincos_embed, take_rows, weight_init, xavier_init

# ---------------------------------------------------------------- shared by MAE and DropPos


class Decoder(nn.Module):
    """MAE's light decoder, also DropPos': `embed` to its width (the caller applies it first), blocks, a norm
    and a linear prediction per token."""

    def __init__(self, dim, width, depth, n_out):
        super().__init__()
        self.embed = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(Block(width, max(1, width // 32), 4.0, 0.0) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.pred = nn.Linear(width, n_out)

    def forward(self, x):
        """Embedded tokens (B, T, width) -> predictions (B, T, n_out)."""
        return self.pred(self.norm(run_blocks(self.blocks, x)))


@dataclass
class MaskedGridConfig(InputConfig):
    """What MAE and DropPos share: patches hidden from the encoder, a decoder (CPU-sized; theirs 512 wide,
    MAE 8 and DropPos 2 deep), and their class token, left out by default as PART's encoder has none."""

    mask_ratio: float = 0.75  # patches hidden from the encoder
    decoder_dim: int = 128
    decoder_depth: int = 2
    class_token: bool = False  # the official code's: prepended after masking, position slot zero, dropped at the end

    def __post_init__(self):
        super().__post_init__()
        self.vit = replace(self.vit, class_token=self.class_token)


def class_slot(pos):
    """(B or 1, T, D) -> (B or 1, 1 + T, D), the class token's slot first and zero (MAE's sin-cos table)."""
    return F.pad(pos, (0, 0, 1, 0))


def hide_patches(patches, ratio):
    """MAE's and DropPos' masking: (B, N, C, *patch) -> visible patches (B, N - M, C, *patch), their indices
    (B, N - M), the hidden ones' (B, M), M = round(ratio * N), fresh per item."""
    B, N = patches.shape[:2]
    kept, hidden = random_split(B, N, ratio, patches.device)
    return take_rows(patches.flatten(2), kept).view(B, -1, *patches.shape[2:]), kept, hidden


def split_sizes(flag, ratio, n, kept_role=None, dropped_role=None):
    """random_split's count of kept tokens of n; an error when the ratio is not a share or a side the method
    needs (its role named) would be empty, so that no run trains on nothing."""
    check_share(flag, ratio)
    dropped = round(ratio * n)
    for count, role in ((n - dropped, kept_role), (dropped, dropped_role)):
        if role and count == 0:
            raise UserError(f"{flag} {ratio} leaves no patch of the {n} {role}")
    return n - dropped


# ---------------------------------------------------------------- MAE


@dataclass
class MAEConfig(MaskedGridConfig):
    """MAE (He et al., CVPR 2022) on our ViT."""

    norm_pix: bool = True  # targets: each patch's pixels normalised by their own mean and std (MAE's best)

    def __post_init__(self):
        super().__post_init__()
        split_sizes("--mask-ratio", self.mask_ratio, math.prod(self.grid), "for the encoder to see", "to reconstruct")


def patch_targets(patches, norm_pix):
    """MAE's targets: (B, N, C, *patch) -> (B, N, C * prod(patch)), with norm_pix by each patch's own mean and
    (unbiased) variance."""
    x = patches.flatten(2).float()
    if not norm_pix:
        return x
    return (x - x.mean(dim=-1, keepdim=True)) / (x.var(dim=-1, keepdim=True) + 1e-6).sqrt()


class MAE(nn.Module):
    """Masked autoencoding: the encoder sees the visible grid patches with fixed sin-cos position embeddings;
    the decoder fills in mask tokens and predicts the masked patches' pixels."""

    def __init__(self, cfg: MAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = VisionTransformer(cfg.vit)
        v = cfg.vit
        self.decoder = Decoder(v.embed_dim, cfg.decoder_dim, cfg.decoder_depth, v.in_chans * v.patch_size**v.patch_ndim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_dim))
        self.apply(xavier_init)  # encoder and decoder
        nn.init.normal_(self.mask_token, std=0.02)
        self.normalize = Normalize(cfg.mean, cfg.std, len(cfg.img_size))
        positions = grid_positions(cfg)  # (N, d)
        self.register_buffer("fixed_pos_embed", sincos_embed(positions, v.embed_dim)[None])  # (1, N, D), for finetuning
        decoder_pos = sincos_embed(positions, cfg.decoder_dim)[None]  # (1, N, Dd)
        decoder_pos = class_slot(decoder_pos) if cfg.class_token else decoder_pos  # (1, c + N, Dd)
        self.register_buffer("decoder_pos", decoder_pos, persistent=False)

    def forward(self, images, labels=None):
        """images (B, C, H, W) or signals (B, C, T) -> (loss, metrics): MSE on the masked patches."""
        patches = patchify(self.normalize(images), self.cfg.vit.patch_size)  # (B, N, C, *patch)
        B, N = patches.shape[:2]
        visible, kept, masked = hide_patches(patches, self.cfg.mask_ratio)  # (B, N - M, C, *patch), (B, N - M), (B, M)
        pos, c = self.fixed_pos_embed[0, kept], int(self.cfg.class_token)  # (B, N - M, D); c: class tokens first
        tokens = self.decoder.embed(self.encoder.forward_features(visible, pos=class_slot(pos) if c else pos))
        index = kept[..., None].expand(-1, -1, tokens.shape[-1])  # tokens: (B, c + N - M, Dd)
        full = self.mask_token.to(tokens.dtype).expand(B, N, -1).scatter(1, index, tokens[:, c:])  # mask tokens between
        full = torch.cat([tokens[:, :c], full], dim=1)  # (B, c + N, Dd)
        pred = self.decoder(full + self.decoder_pos)[:, c:]  # (B, N, C * prod(patch))
        target = patch_targets(patches, self.cfg.norm_pix)
        loss = F.mse_loss(take_rows(pred, masked).float(), take_rows(target, masked))
        return loss, {"loss": loss.detach()}


# ---------------------------------------------------------------- DropPos


@dataclass
class DropPosConfig(MaskedGridConfig):
    """DropPos (Wang et al., NeurIPS 2023) on our ViT; its attentive reconstruction (--attn_guide: the class
    token and a second encoder pass) off by default."""

    pos_mask_ratio: float = 0.75  # visible patches whose position embedding is dropped
    sigma: float = 1.0  # position smoothing at the start, in patches; (1 - epoch / epochs) sigma in each epoch
    attentive: bool = False  # weight each dropped token's loss by its similarity to the class token (--attn_guide)

    def __post_init__(self):
        super().__post_init__()
        if self.attentive and not self.class_token:
            raise UserError("--attentive weighs patches by their similarity to the class token: add --class-token")
        visible = split_sizes("--mask-ratio", self.mask_ratio, math.prod(self.grid), "for the encoder to see")
        split_sizes(
            "--pos-mask-ratio", self.pos_mask_ratio, visible, dropped_role="visible to lose its position (the loss)"
        )


def smoothed_positions(positions, sigma):
    """DropPos' position smoothing, (N, d) -> (N, N): row i, the target of a token at position i, from
    w_ij = exp(-|p_i - p_j|^2 / sigma^2), one-hot at sigma 0. Its `weight / weight.sum(-1)` broadcasts the sums
    over the last dim: column j is divided by its sum (w is symmetric), so a row sums to about 1."""
    if sigma == 0:
        return torch.eye(len(positions), device=positions.device)
    weight = torch.exp(-torch.cdist(positions, positions).square() / sigma**2)
    return weight / weight.sum(dim=0, keepdim=True)


class DropPos(nn.Module):
    """Reconstructing dropped positions: a share of the visible grid patches gets a learnt mask token for its
    sin-cos position embedding; a decoder classifies each token's grid position, with the loss on those."""

    def __init__(self, cfg: DropPosConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = VisionTransformer(cfg.vit)
        positions = grid_positions(cfg)  # (N, d)
        self.decoder = Decoder(cfg.vit.embed_dim, cfg.decoder_dim, cfg.decoder_depth, len(positions))
        self.mask_pos_token = nn.Parameter(torch.zeros(1, 1, cfg.vit.embed_dim))
        self.apply(xavier_init)  # encoder and decoder
        nn.init.normal_(self.mask_pos_token, std=0.02)
        self.normalize = Normalize(cfg.mean, cfg.std, len(cfg.img_size))
        self.register_buffer("positions", positions, persistent=False)
        self.register_buffer("fixed_pos_embed", sincos_embed(positions, cfg.vit.embed_dim)[None])  # for finetuning
        self.sigma = cfg.sigma  # the smoothing of this epoch (set_epoch)

    def set_epoch(self, epoch, epochs):
        """DropPos' schedule: sigma = (1 - epoch / epochs) sigma_0 through 0-based `epoch`, never 0 (engine.fit)."""
        self.sigma = self.cfg.sigma * (1 - epoch / epochs)

    def sample(self, patches):
        """Patches (B, N, C, *patch) -> the visible ones (B, V, C, *patch), their grid indices (B, V), and (B, V)
        True where the position embedding is dropped."""
        visible, kept, _ = hide_patches(patches, self.cfg.mask_ratio)  # (B, V, C, *patch), (B, V)
        B, V = kept.shape
        dropped = as_mask(random_split(B, V, self.cfg.pos_mask_ratio, patches.device)[1], V)
        return visible, kept, dropped

    @torch.no_grad()
    def patch_attention(self, patches):
        """DropPos' attentive weights (get_feature_similarity), (B, N, ...) -> (B, N): the encoder on every patch at
        its position, then the softmax over patches of cos(class token, patch token) / 0.1."""
        tokens = self.encoder.forward_features(patches, pos=class_slot(self.fixed_pos_embed))  # (B, 1 + N, D)
        return (F.cosine_similarity(tokens[:, :1], tokens[:, 1:], dim=-1).float() / 0.1).softmax(dim=-1)

    def loss(self, logits, kept, weight):
        """Cross-entropy of the position logits (B, V, N) against the smoothed positions, and the position
        accuracy, both averaged with `weight` (B, V) -> (loss, metrics)."""
        target = smoothed_positions(self.positions, self.sigma)[kept]  # (B, V, N)
        ce = -(target * logits.float().log_softmax(dim=-1)).sum(dim=-1)  # (B, V)
        loss = (ce * weight).sum() / weight.sum()
        acc = ((logits.argmax(dim=-1) == kept).float() * weight).sum() / weight.sum()
        return loss, {"loss": loss.detach(), "pos_acc": acc}

    def forward(self, images, labels=None):
        """images (B, C, H, W) or signals (B, C, T) -> (loss, metrics)."""
        patches = patchify(self.normalize(images), self.cfg.vit.patch_size)  # (B, N, C, *patch)
        visible, kept, dropped = self.sample(patches)
        pos = torch.where(dropped[..., None], self.mask_pos_token, self.fixed_pos_embed[0, kept])  # (B, V, D)
        c = int(self.cfg.class_token)  # class tokens first
        tokens = self.encoder.forward_features(visible, pos=class_slot(pos) if c else pos)  # (B, c + V, D)
        logits = self.decoder(self.decoder.embed(tokens))[:, c:]  # (B, V, N)
        weight = dropped.float()  # (B, V)
        if self.cfg.attentive:  # the visible patches' weights, renormalised over them (DropPos' forward_encoder)
            attention = self.patch_attention(patches).gather(1, kept)  # (B, V)
            weight = weight * attention / attention.sum(dim=-1, keepdim=True)
        return self.loss(logits, kept, weight)


# ---------------------------------------------------------------- MP3


@dataclass
class MP3Config(InputConfig):
    """MP3 (Zhai et al., ICML 2022) on our ViT, built from its abstract: docs/comparison.md gives each choice."""

    mask_ratio: float = 0.75  # eta: share of the patches that give no keys and values (MAE's ratio; the paper's unread)

    def __post_init__(self):
        super().__post_init__()
        split_sizes("--mask-ratio", self.mask_ratio, math.prod(self.grid), "to give keys and values")


class MP3(nn.Module):
    """Masked position prediction: the grid patches without position embeddings, each a query, keys and values
    from a random context of them in every block; a linear head classifies each patch's grid position."""

    def __init__(self, cfg: MP3Config):
        super().__init__()
        self.cfg = cfg
        self.encoder = VisionTransformer(cfg.vit)  # trunc_normal(0.02), DeiT's: MP3's code is built on DeiT
        self.head = nn.Linear(cfg.vit.embed_dim, math.prod(cfg.grid))
        self.head.apply(weight_init(cfg.vit))
        self.normalize = Normalize(cfg.mean, cfg.std, len(cfg.img_size))

    def forward(self, images, labels=None):
        """images (B, C, H, W) or signals (B, C, T) -> (loss, metrics with the position accuracy)."""
        patches = patchify(self.normalize(images), self.cfg.vit.patch_size)  # (B, N, C, *patch)
        B, N = patches.shape[:2]
        context, _ = random_split(B, N, self.cfg.mask_ratio, images.device)  # (B, N - M)
        logits = self.head(self.encoder.forward_features(patches, context=context)).float()  # (B, N, N)
        # raster order tells a permutation-equivariant encoder nothing
        target = torch.arange(N, device=images.device).expand(B, N)  # (B, N) each patch's grid index
        loss = F.cross_entropy(logits.flatten(0, 1), target.flatten())
        acc = (logits.argmax(dim=-1) == target).float().mean()
        return loss, {"loss": loss.detach(), "pos_acc": acc}


# ---------------------------------------------------------------- the registry

METHODS = {
    "part": (PARTConfig, PART),
    "mae": (MAEConfig, MAE),
    "droppos": (DropPosConfig, DropPos),
    "mp3": (MP3Config, MP3),
}


def pretext_config(method, **fields):
    """The config of `method`'s pretraining model from flags; the flags of other methods are left out."""
    if method not in METHODS:
        raise UserError(f"unknown --method {method!r}, expected one of {list(METHODS)}")
    config_class = METHODS[method][0]
    names = {f.name for f in dataclasses.fields(config_class)}
    return config_class(**{k: v for k, v in fields.items() if k in names})


def pretext_model(method, cfg):
    return METHODS[method][1](cfg)
