"""PART: the patch sampler, the ViT encoder, the relative heads and the loss; the classifier that finetunes
any encoder. The baselines (MAE, DropPos) are in baselines.py.

Ayoughi et al., "How PARTs assemble into wholes: learning the relative
composition of images", NLDL 2026, section 4 (method) and 8.1 (details).

    sample N boxes -> crop-and-resize to P x P -> ViT without position
    embeddings -> relative head on K (reference, target) pairs -> MSE on
    the relative translation (and, with scale, the relative size).

Everything here is shape-generic over the number of spatial dimensions d:
an input is (B, C, H, W) or a signal (B, C, T); a box is (lo_1..lo_d, hi_1..hi_d),
so (x0, y0, x1, y1) for images and (t0, t1) for 1D windows (sleep1d.py). The ViT
takes a sequence of patches (B, N, C, *patch) and never sees where they came from,
unless given position embeddings. The file follows the data: boxes and crops ->
pairs and targets -> ViT -> relative heads and loss -> PART -> the classifier
that finetunes any encoder, and kNN on frozen features.

    python train.py pretrain          # trains PART on Fashion-MNIST
"""

import math
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class ConfigError(ValueError):
    """A setting that cannot work, its message naming the command-line flag: the CLIs print it as one line."""


# ---------------------------------------------------------------- sampling

SAMPLERS = ("offgrid", "offgrid-scale", "grid")


def grid_boxes(size, P, device=None):
    """The canonical non-overlapping grid in raster order, (N, 2d) as (lo, hi) per coordinate:
    x0, y0, x1, y1 for images of size (H, W), t0, t1 for signals of length (T,)."""
    axes = [torch.arange(0, s, P, device=device, dtype=torch.float) for s in size]  # rows first: y, then x
    lo = torch.stack([a.flatten() for a in torch.meshgrid(*axes, indexing="ij")][::-1], dim=1)  # (N, d) as x, y
    return torch.cat([lo, lo + P], dim=1)


def sample_boxes(B, size, P, N, mode, device=None):
    """Draw N boxes per input independently, (B, N, 2d) float pixels as (lo, hi) per coordinate;
    size is (H, W) for images, (T,) for signals (where a box is a window (t0, t1)).

    offgrid:       P-sided boxes at uniform continuous positions (section 4 "Sampling").
    offgrid-scale: each side uniform in [P/2, 2P] (section 5.1 ii).
    grid:          the canonical grid in a random order per input (PART-grid, Table 4).
    """
    if mode == "grid":
        boxes = grid_boxes(size, P, device)  # (N, 2d)
        order = torch.rand(B, boxes.shape[0], device=device).argsort(dim=1)  # a permutation per input
        return boxes[order]
    extent = torch.tensor(size[::-1], device=device, dtype=torch.float)  # (d,) as x, y
    if mode == "offgrid":
        sides = torch.full((B, N, len(size)), float(P), device=device)
    elif mode == "offgrid-scale":
        sides = torch.minimum(torch.empty(B, N, len(size), device=device).uniform_(P / 2, 2 * P), extent)
    else:
        raise ConfigError(f"unknown sampler {mode!r}, expected one of {SAMPLERS}")
    lo = torch.rand(B, N, len(size), device=device) * (extent - sides)  # uniform over the positions that fit
    return torch.cat([lo, lo + sides], dim=-1)


def crop_patches(images, boxes, P, scaled=False):
    """Crop every box and resize it to P pixels a side in one batched call: images (B, C, H, W) and
    boxes (B, N, 4) -> (B, N, C, P, P); signals (B, C, T) and windows (B, N, 2) -> (B, N, C, P).

    roi_align with aligned=True reads pixel centres at integer coordinates. A box of side P
    (scaled=False) takes exactly one bilinear sample per output pixel, at that pixel's centre,
    so an integer box returns its pixels exactly. With scaled=True (boxes of other sizes) each
    output pixel averages ceil(size / P) samples per dimension rather than aliasing; that
    adaptive rule is not used for P-sided boxes, whose float width P + eps would get two.
    A signal is read as an image one pixel high and a window (t0, t1) as the box (t0, 0, t1, 1).
    """
    from torchvision.ops import (
        roi_align,
    )  # imported here: torchvision brings PIL and its datasets, which part.py needs not

    if images.ndim == 3:
        zero = torch.zeros_like(boxes[..., :1])
        rows = torch.cat([boxes[..., :1], zero, boxes[..., 1:], zero + 1], dim=-1)  # (B, N, 4)
        return crop_patches(images[:, :, None], rows, (1, P), scaled).squeeze(-2)  # (B, N, C, P)
    B, N, _ = boxes.shape
    C = images.shape[1]
    index = torch.arange(B, device=boxes.device, dtype=boxes.dtype).repeat_interleave(N)[:, None]
    rois = torch.cat([index, boxes.reshape(B * N, 4)], dim=1)  # (B*N, 5): batch index, x0, y0, x1, y1
    patches = roi_align(
        images, rois.to(images.dtype), output_size=P, spatial_scale=1.0, sampling_ratio=-1 if scaled else 1,
        aligned=True,
    )
    return patches.reshape(B, N, C, *patches.shape[-2:])


def patchify(images, P):
    """On-grid patches in raster order: (B, C, H, W) -> (B, N, C, P, P), N = (H/P)(W/P);
    signals (B, C, T) -> (B, T/P, C, P)."""
    if images.ndim == 3:
        B, C, T = images.shape
        return images.reshape(B, C, T // P, P).transpose(1, 2)
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // P, P, W // P, P)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // P) * (W // P), C, P, P)


def random_split(B, N, ratio, device=None):
    """A fresh random split of N tokens per item: (kept (B, N - M), dropped (B, M)) indices,
    M = round(ratio * N) (MAE's masking, DropPos' position dropping, PART's --pos-mask)."""
    order = torch.rand(B, N, device=device).argsort(dim=1)
    M = round(ratio * N)
    return order[:, : N - M], order[:, N - M :]


def as_mask(index, N):
    """Indices (B, M) -> a boolean mask (B, N), True at them."""
    return torch.zeros(index.shape[0], N, dtype=torch.bool, device=index.device).scatter_(1, index, True)


def sincos_embed(coords, dim):
    """Fixed sin-cos position embeddings of continuous coordinates, (..., d) -> (..., dim): dim / d
    channels per coordinate, half sines and half cosines at frequencies 10000^(-k / (dim / 2d))
    (the Transformer's; MAE's 2D form), zero-padded to dim."""
    d = coords.shape[-1]
    n = dim // (2 * d)
    freq = 10000.0 ** (-torch.arange(n, device=coords.device, dtype=torch.float) / n)  # (n,)
    angles = coords[..., None].float() * freq  # (..., d, n)
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # (..., d * 2n)
    return F.pad(emb, (0, dim - emb.shape[-1]))


def sample_pairs(B, N, K, device=None, masked=None):
    """K distinct ordered (reference, target) index pairs per item, (B, K, 2).

    Drawn without replacement from all N*N ordered pairs (a patch paired with
    itself has target 0): CIFAR's 64 patches and the paper's 4096 pairs need that.
    masked (B, N) bool, optional: only from the pairs with a masked member (--pos-mask; PARTConfig has
    checked that K of them exist, so that nothing here reads a tensor back to the host, which would
    break a compiled graph).
    """
    if K > N * N:
        raise ConfigError(f"--pairs {K} is more than the {N * N} ordered pairs of {N} patches")
    scores = torch.rand(B, N * N, device=device)  # (B, N*N)
    if masked is not None:
        scores = scores.masked_fill(~(masked[:, :, None] | masked[:, None, :]).flatten(1), -1.0)
    flat = scores.topk(K, dim=1).indices  # (B, K) a random K-subset of the allowed pairs
    return torch.stack([flat // N, flat % N], dim=-1)


def centres_sizes(boxes):
    """Boxes (..., 2d) as (lo, hi) per dimension -> float centres (..., d) and sizes (..., d)."""
    d = boxes.shape[-1] // 2
    return (boxes[..., :d] + boxes[..., d:]).float() / 2, (boxes[..., d:] - boxes[..., :d]).float()


def relative_targets(boxes, pairs, scale=False):
    """Relative translation (and size) of target w.r.t. reference box (section 4 "Objective").

    boxes (B, N, 2d) as (lo, hi) per dimension, pairs (B, K, 2) -> (B, K, d) or (B, K, 2d):
    d_i = (c_tgt - c_ref) / s_ref for box centres c and sizes s; with scale, also s_tgt / s_ref.
    Always float: rounding these to integers would erase the off-grid signal.
    """
    d = boxes.shape[-1] // 2
    centre, size = centres_sizes(boxes)  # (B, N, d) each
    take = lambda t, i: torch.gather(t, 1, pairs[..., i : i + 1].expand(-1, -1, d))  # noqa: E731 (B, K, d)
    c_ref, c_tgt, s_ref, s_tgt = take(centre, 0), take(centre, 1), take(size, 0), take(size, 1)
    shift = (c_tgt - c_ref) / s_ref
    return torch.cat([shift, s_tgt / s_ref], dim=-1) if scale else shift


# ---------------------------------------------------------------- ViT


@dataclass
class ViTConfig:
    patch_size: int = 16  # P, pixels (or samples, for 1D windows)
    in_chans: int = 3
    embed_dim: int = 768  # D
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    drop_path: float = 0.0  # stochastic depth, max rate at the last block
    patch_ndim: int = 2  # 2: P x P image patches; 1: windows of P samples
    window: int = 0  # attention within window x window tokens of the token grid (ViTDet; detection only), 0: global
    global_blocks: tuple = ()  # blocks that stay global with window > 0 (ViTDet, 12 blocks: 2, 5, 8, 11)
    # finetuning only: PART pretrains with neither (section 4 "Training setup")
    class_token: bool = False
    pos_grid: tuple = ()  # token grid of the learnable position embeddings, () for none
    num_classes: int = 0  # 0: no head, forward returns pooled features
    pool: str = "cls"  # "cls" or "avg"
    fc_norm: bool = (
        False  # a new LayerNorm after avg pooling in place of the final norm on the tokens (MAE's global pool)
    )
    xavier_init: bool = False  # --xavier-init: every Linear xavier-uniform (MAE's, DropPos' init); else DeiT's


PRESETS = {  # widths and depths of DeiT / timm
    "vit_test": dict(embed_dim=32, depth=2, num_heads=2),  # for the test suite only
    "vit_mini": dict(embed_dim=128, depth=4, num_heads=4),  # CPU-sized default
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_s": dict(embed_dim=384, depth=12, num_heads=6),  # the paper's CIFAR-100 backbone (ViT-S/4)
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12),  # the paper's ImageNet / COCO backbone (ViT-B/16)
}


def vit_config(preset, **overrides):
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}, expected one of {list(PRESETS)}")
    return ViTConfig(**{**PRESETS[preset], **overrides})


class Attention(nn.Module):
    """Multi-head attention: self-attention on x, or cross-attention from x to ctx; with window > 0
    and the token grid (h, w) given, self-attention within non-overlapping window x window blocks of
    the grid (ViTDet, without its relative position biases; as there, the zero padding of a grid that
    the windows do not tile takes part in attention)."""

    def __init__(self, dim, num_heads, window=0):
        super().__init__()
        self.num_heads, self.window = num_heads, window
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, ctx=None, grid=None):
        if self.window and grid is not None:
            B, N, D = x.shape
            windows = window_partition(x.reshape(B, *grid, D), self.window)  # (B * windows, window^2, D)
            return window_unpartition(self.attend(windows), self.window, B, *grid).reshape(B, N, D)
        return self.attend(x, ctx)

    def attend(self, x, ctx=None):
        B, N, D = x.shape
        nh, hs = self.num_heads, D // self.num_heads
        if ctx is None:
            q, k, v = self.qkv(x).split(D, dim=-1)
        else:  # queries from x, keys and values from ctx, with the same weights
            w_q, w_kv = self.qkv.weight.split([D, 2 * D])
            b_q, b_kv = self.qkv.bias.split([D, 2 * D])
            q, (k, v) = F.linear(x, w_q, b_q), F.linear(ctx, w_kv, b_kv).split(D, dim=-1)
        q, k, v = (t.reshape(B, -1, nh, hs).transpose(1, 2) for t in (q, k, v))  # (B, nh, N|M, hs)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, nh, N, hs)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


def window_partition(x, window):
    """(B, h, w, D) -> (B * windows, window * window, D), zero-padding h and w to multiples of window."""
    B, h, w, D = x.shape
    x = F.pad(x, (0, 0, 0, -w % window, 0, -h % window))
    nh, nw = x.shape[1] // window, x.shape[2] // window
    x = x.reshape(B, nh, window, nw, window, D).transpose(2, 3)  # (B, nh, nw, window, window, D)
    return x.reshape(B * nh * nw, window * window, D)


def window_unpartition(x, window, B, h, w):
    """The inverse of window_partition, dropping the padding: -> (B, h, w, D)."""
    nh, nw, D = -(-h // window), -(-w // window), x.shape[-1]
    x = x.reshape(B, nh, nw, window, window, D).transpose(2, 3)  # (B, nh, window, nw, window, D)
    return x.reshape(B, nh * window, nw * window, D)[:, :h, :w]


class Mlp(nn.Module):
    def __init__(self, dim, hidden, out=None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: drop a sample's whole residual branch with probability p."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = torch.rand(x.shape[0], *(1,) * (x.ndim - 1), device=x.device) >= self.p
        return x * keep.to(x.dtype) / (1 - self.p)


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, drop_path, window=0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, window)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x, grid=None, context=None):
        """x (B, N, D) -> (B, N, D). context (B, M), optional: the tokens whose keys and values every token
        attends to (MP3); default all of them."""
        h = self.norm1(x)
        x = x + self.drop_path(self.attn(h, ctx=None if context is None else take_rows(h, context), grid=grid))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Linear embedding of patches that are already cut out: (B, N, C, *patch) -> (B, N, D).

    The weight is stored as timm's Conv2d (Conv1d for 1D windows), so checkpoints
    load into timm, but applied as one matmul because the patches may come from anywhere.
    """

    def __init__(self, patch_size, in_chans, dim, patch_ndim=2):
        super().__init__()
        conv = nn.Conv2d if patch_ndim == 2 else nn.Conv1d
        self.proj = conv(in_chans, dim, patch_size, patch_size)

    def forward(self, patches):
        return F.linear(patches.flatten(2), self.proj.weight.flatten(1), self.proj.bias)


class VisionTransformer(nn.Module):
    """A ViT over a sequence of patches, with timm / DINO parameter names.

    PART pretrains it without class token and position embeddings, so it is
    permutation-equivariant in its patches; finetuning adds both (cfg.class_token,
    cfg.pos_grid) and a linear head (cfg.num_classes).
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, D, cfg.patch_ndim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.class_token else None
        num_pos = math.prod(cfg.pos_grid) + int(cfg.class_token) if cfg.pos_grid else 0
        self.pos_embed = nn.Parameter(torch.zeros(1, num_pos, D)) if cfg.pos_grid else None
        rates = torch.linspace(0, cfg.drop_path, cfg.depth).tolist()
        windows = [0 if i in cfg.global_blocks else cfg.window for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(D, cfg.num_heads, cfg.mlp_ratio, r, w) for r, w in zip(rates, windows))
        self.norm = (
            nn.Identity() if cfg.fc_norm else nn.LayerNorm(D, eps=1e-6)
        )  # MAE's models_vit.py deletes norm for fc_norm
        self.fc_norm = nn.LayerNorm(D, eps=1e-6) if cfg.fc_norm else None
        self.head = nn.Linear(D, cfg.num_classes) if cfg.num_classes else nn.Identity()
        self.grad_checkpointing = False  # timm's name; a memory setting, not part of the model (train.fit sets it)
        self.apply(weight_init(cfg))
        for p in (self.cls_token, self.pos_embed):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)  # timm's init for tokens and position embeddings

    def position_embedding(self, grid=None):
        """The learnable position embeddings (1, T, D), class token's first, resized to the token grid
        `grid` when given; None for an encoder without them (PART's)."""
        if self.pos_embed is None or grid is None:
            return self.pos_embed
        return resize_pos_embed(self.pos_embed, self.cfg.pos_grid, grid, int(self.cfg.class_token))

    def forward_features(self, patches, pos=None, grid=None, context=None):
        """(B, N, C, *patch) -> tokens (B, T, D), T = N (+1 with a class token first).

        pos (B or 1, T, D), optional: the position embedding of every token, computed by the caller (the
        fixed sin-cos of MAE and DropPos, PART's continuous ones with --pos-mask, a classifier's with a
        share masked out); default: the encoder's own, if it has them. grid, optional: the token grid
        (h, w) of on-grid patches in raster order, for window attention and resized embeddings (detection).
        context (B, M), optional: indices of the tokens that alone give keys and values, the same in
        every block, while every token is a query (MP3's masked transformer).
        """
        x = self.patch_embed(patches)  # (B, N, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        pos = self.position_embedding(grid) if pos is None else pos
        if pos is not None:
            x = x + pos.to(x.dtype)
        return self.norm(run_blocks(self.blocks, x, self.grad_checkpointing, grid, context))

    def pool(self, tokens, how=None):
        """Tokens (B, T, D) -> (B, D): the class token ("cls") or the mean of the patch tokens ("avg"),
        then fc_norm if the encoder has it; default: the config's pool."""
        how = how or self.cfg.pool
        if how == "cls":
            return tokens[:, 0]
        pooled = tokens[:, int(self.cfg.class_token) :].mean(dim=1)
        return pooled if self.fc_norm is None else self.fc_norm(pooled)

    def forward(self, patches, pos=None):
        """(B, N, C, *patch) -> logits (B, classes), or pooled features (B, D) without a head."""
        return self.head(self.pool(self.forward_features(patches, pos)))


def run_blocks(blocks, x, checkpointed=False, grid=None, context=None):
    """x through the blocks in order (grid, context: as Block's). checkpointed: while training, keep no
    activations inside a block and recompute them in backward (activation checkpointing: less memory,
    ~1/3 more compute; the recomputation replays drop path's random draws, so gradients are the same)."""
    for block in blocks:
        if checkpointed and torch.is_grad_enabled():
            x = checkpoint(block, x, grid, context, use_reentrant=False)
        else:
            x = block(x, grid, context)
    return x


def set_grad_checkpointing(model, on=True):
    """Activation checkpointing (run_blocks) on or off in every ViT of `model`: a memory setting, the same gradients."""
    for m in model.modules():
        if isinstance(m, VisionTransformer):
            m.grad_checkpointing = on


def weight_init(vit):
    """The init of a model on the ViT `vit` (ViTConfig): DeiT's trunc-normal, or MAE's xavier with --xavier-init."""
    return xavier_init if vit.xavier_init else _init_weights


def xavier_init(m):
    """MAE's and DropPos' init (models_mae.py `_init_weights`, DropPos' the same): xavier_uniform for every
    Linear, the fused qkv as one matrix, bias 0; LayerNorm 1, 0 and the patch embedding as _init_weights."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        nn.init.zeros_(m.bias)
    else:
        _init_weights(m)


def _init_weights(m):
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)  # ViT / DeiT init
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.Conv1d, nn.Conv2d)):  # patch embedding initialised as a linear layer (MAE)
        nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
        nn.init.zeros_(m.bias)


def feature_map(tokens, grid):
    """Patch tokens in raster order back to a map: (B, N, D) -> (B, D, *grid)."""
    B, N, D = tokens.shape
    return tokens.transpose(1, 2).reshape(B, D, *grid)


def resize_pos_embed(pos_embed, old_grid, new_grid, num_prefix):
    """Interpolate position embeddings to another token grid (bicubic in 2D, linear in 1D).

    (1, num_prefix + prod(old_grid), D) -> (1, num_prefix + prod(new_grid), D); the class
    token's embedding is kept as it is. Non-square grids are fine.
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    grid = feature_map(grid, old_grid)  # (1, D, *old_grid)
    mode = "bicubic" if len(old_grid) == 2 else "linear"
    grid = F.interpolate(grid.float(), size=tuple(new_grid), mode=mode, align_corners=False).to(pos_embed.dtype)
    return torch.cat([prefix, grid.flatten(2).transpose(1, 2)], dim=1)


# ---------------------------------------------------------------- relative heads

HEADS = ("cross-attention", "cross-attention-residual", "pairwise-mlp", "mlp")


def gather_pairs(x, pairs):
    """Embeddings of both members of each pair, concatenated: (B, N, D), (B, K, 2) -> (B, K, 2D)."""
    B, N, D = x.shape
    K = pairs.shape[1]
    picked = torch.gather(x, 1, pairs.reshape(B, 2 * K, 1).expand(-1, -1, D))  # (B, 2K, D)
    return picked.reshape(B, K, 2 * D)


def take_rows(table, index):
    """Rows of a per-item table: (B, N, M), (B, K) -> (B, K, M), row index[b, k] of table[b]."""
    return torch.gather(table, 1, index[..., None].expand(-1, -1, table.shape[-1]))


class CrossAttentionHead(nn.Module):
    """The paper's relative encoder (section 4, "Relative encoder architecture"), for K pairs (ref, tgt):

        Q = W [X'_ref ; X'_tgt] + b                 (K, D)  a linear map of the concatenated pair
        A = softmax(Q X'^T / sqrt(D))               (K, N)  X' as keys ...
        out = R (A X') + r                          (K, n_out)  ... and values, then the regressor R

    No linear map runs per pair. W = [W_ref W_tgt] splits over the concatenation, so
    Q X'^T = (X' W_ref^T X'^T)[ref] + (X' W_tgt^T X'^T)[tgt] + b X'^T: two N x N score tables per
    image, whose rows the pairs gather; and since A's rows sum to one, R (A X') + r = A (X' R^T + r):
    the regressor runs on the N tokens before A averages them. A pair costs O(N n_out), not
    O(N D + D^2); the straightforward form is `reference_forward`, kept for the tests.
    """

    def __init__(self, dim, n_out):
        super().__init__()
        self.query = nn.Linear(2 * dim, dim)  # W, b
        self.regressor = nn.Linear(dim, n_out)  # R, r

    def forward(self, x, pairs):
        """x (B, N, D), pairs (B, K, 2) -> (B, K, n_out)."""
        B, N, D = x.shape
        w = self.query.weight.view(D, 2, D).transpose(0, 1).reshape(2 * D, D) / math.sqrt(D)  # [W_ref; W_tgt] / sqrt(D)
        q = (
            F.linear(x, w).view(B, N, 2, D).transpose(1, 2).reshape(B, 2 * N, D)
        )  # (B, 2N, D): W_ref x_i, then W_tgt x_i
        tables = q @ x.transpose(
            1, 2
        )  # (B, 2N, N): row i (or N + i) = token i's score for every key as reference (target)
        rows = pairs + torch.tensor([0, N], device=pairs.device)  # (B, K, 2): each pair's rows in the tables
        scores = take_rows(tables, rows.reshape(B, -1)).view(B, -1, 2, N).sum(dim=2)  # (B, K, N)
        scores = scores + (x @ self.query.bias / math.sqrt(D))[:, None]  # + b . x_j / sqrt(D)
        return scores.softmax(dim=-1) @ self.regressor(x)  # (B, K, N) @ (B, N, n_out)

    def reference_forward(self, x, pairs):
        """The same, written as the paper's equation: every map applied per pair."""
        q = self.query(gather_pairs(x, pairs))  # (B, K, D)
        attn = (q @ x.transpose(1, 2) / math.sqrt(x.shape[-1])).softmax(dim=-1)  # (B, K, N)
        return self.regressor(attn @ x)  # (B, K, n_out)


class ResidualCrossAttentionHead(nn.Module):
    """Not the paper's: the cross-attention head as a pre-norm transformer block, with a residual
    around the attention and multi-head projections, so the pair's own query reaches the regressor
    directly. `--head cross-attention-residual`; its cost is per pair (README, "Performance")."""

    def __init__(self, dim, num_heads, n_out):
        super().__init__()
        self.query = nn.Linear(2 * dim, dim)
        self.norm_q = nn.LayerNorm(dim, eps=1e-6)
        self.norm_kv = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.regressor = nn.Linear(dim, n_out)

    def forward(self, x, pairs):
        """x (B, N, D), pairs (B, K, 2) -> (B, K, n_out)."""
        q = self.query(gather_pairs(x, pairs))  # (B, K, D)
        q = q + self.attn(self.norm_q(q), ctx=self.norm_kv(x))  # (B, K, D)
        return self.regressor(self.norm(q))


class PairwiseMlpHead(nn.Module):
    """Table 5's pairwise MLP: one linear map of the concatenated pair, 2D x n_out weights (the
    paper's "2*d*2 parameters") shared across pairs; it sees only the two patches of a pair.

    W [x_ref ; x_tgt] + b = W_ref x_ref + W_tgt x_tgt + b, so both halves run on the N tokens
    and the pairs gather the results; `reference_forward` is the per-pair form.
    """

    def __init__(self, dim, n_out):
        super().__init__()
        self.linear = nn.Linear(2 * dim, n_out)

    def forward(self, x, pairs):
        """x (B, N, D), pairs (B, K, 2) -> (B, K, n_out)."""
        w_ref, w_tgt = self.linear.weight.split(x.shape[-1], dim=1)  # (n_out, D) each
        return take_rows(x @ w_ref.T, pairs[..., 0]) + take_rows(x @ w_tgt.T, pairs[..., 1]) + self.linear.bias

    def reference_forward(self, x, pairs):
        return self.linear(gather_pairs(x, pairs))


class MlpHead(nn.Module):
    """Table 5's fully connected MLP: all N patch embeddings flattened, one linear map to every
    ordered pair's output (the paper's N*d*N^2*2 parameters), no weights shared."""

    def __init__(self, dim, num_patches, n_out):
        super().__init__()
        self.n_out = n_out
        self.linear = nn.Linear(num_patches * dim, num_patches * num_patches * n_out)

    def forward(self, x, pairs):
        """x (B, N, D), pairs (B, K, 2) -> (B, K, n_out)."""
        B, N, D = x.shape
        every = self.linear(x.reshape(B, N * D)).reshape(B, N * N, self.n_out)  # (B, N*N, n_out)
        return take_rows(every, pairs[..., 0] * N + pairs[..., 1])


def relative_head(kind, dim, num_heads, num_patches, n_out):
    if kind == "cross-attention":
        return CrossAttentionHead(dim, n_out)
    if kind == "cross-attention-residual":
        return ResidualCrossAttentionHead(dim, num_heads, n_out)
    if kind == "pairwise-mlp":
        return PairwiseMlpHead(dim, n_out)
    if kind == "mlp":
        return MlpHead(dim, num_patches, n_out)
    raise ConfigError(f"unknown relative head {kind!r}, expected one of {HEADS}")


def relative_errors(pred, target, d=2):
    """The paper's Table 5 errors (8.1: "the l2 error, and the mean squared error in x and y"),
    in units of the reference patch size, as 0-dim tensors, over the d translation coordinates
    (the first d of the targets; size ratios, if any, follow them).

    mse_x, mse_y: mean squared error of the translation coordinates (only x in 1D);
    euclid: mean Euclidean (l2) error of the translation; euclid_zero: the same for the trivial
    predictor of zero translation, the baseline to beat; mae_x, mae_y: mean absolute errors.
    """
    err = (pred[..., :d] - target[..., :d]).float()
    out = {}
    for k, axis in zip(range(d), "xy"):
        out[f"mse_{axis}"] = err[..., k].square().mean()
        out[f"mae_{axis}"] = err[..., k].abs().mean()
    out["euclid"] = err.norm(dim=-1).mean()
    out["euclid_zero"] = target[..., :d].float().norm(dim=-1).mean()
    return out


def relative_loss(pred, target, d=2):
    """MSE over pairs and coordinates (section 4), in fp32 -> (loss, metrics)."""
    pred = pred.float()
    loss = F.mse_loss(pred, target)
    return loss, {"loss": loss.detach(), **relative_errors(pred.detach(), target, d)}


# ---------------------------------------------------------------- PART


def check_stats(mean, std, in_chans):
    """Input statistics as tuples, one value per channel -> (mean, std)."""
    mean, std = tuple(mean), tuple(std)
    if not len(mean) == len(std) == in_chans:
        raise ConfigError(f"mean {mean} and std {std} need one value per input channel, {in_chans}")
    return mean, std


def check_share(name, value):
    if not 0 <= value < 1:
        raise ConfigError(f"{name} {value} must be in [0, 1)")


@dataclass
class InputConfig:
    """What every model here reads: its ViT and the size and statistics of its inputs, images
    (H, W) or signals (T,) (a dict after a checkpoint round trip), checked against each other."""

    vit: ViTConfig = field(default_factory=ViTConfig)
    img_size: tuple = (224, 224)  # (H, W) pixels, or (T,) samples for 1D signals
    mean: tuple = (0.485, 0.456, 0.406)  # input normalisation, per channel
    std: tuple = (0.229, 0.224, 0.225)

    def __post_init__(self):
        self.vit = ViTConfig(**self.vit) if isinstance(self.vit, dict) else self.vit
        self.img_size, P = tuple(self.img_size), self.vit.patch_size
        if len(self.img_size) != self.vit.patch_ndim:
            raise ConfigError(
                f"a {self.vit.patch_ndim}D ViT takes inputs of {self.vit.patch_ndim} dimensions, not {self.img_size}"
            )
        if any(s % P for s in self.img_size):
            raise ConfigError(f"--patch-size {P} must divide the input size {'x'.join(map(str, self.img_size))}")
        self.mean, self.std = check_stats(self.mean, self.std, self.vit.in_chans)

    @property
    def grid(self):
        """The token grid of on-grid patches, (H/P, W/P) or (T/P,)."""
        return tuple(s // self.vit.patch_size for s in self.img_size)

    def to_dict(self):
        return asdict(self)


class Normalize(nn.Module):
    """uint8 inputs, or floats taken as [0, 1] (images) or as they are (signals), -> (x - mean) / std per channel."""

    def __init__(self, mean, std, ndim=2):
        super().__init__()
        shape = (1, -1, *(1,) * ndim)  # (1, C, 1, 1) for images, (1, C, 1) for signals
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float).view(shape), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float).view(shape), persistent=False)

    def forward(self, x):
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        return (x - self.mean) / self.std


def grid_positions(cfg: InputConfig, device=None):
    """The centres of the on-grid patches in raster order, in patch units, (N, d) as x, y."""
    centres, _ = centres_sizes(grid_boxes(cfg.img_size, cfg.vit.patch_size, device))
    return centres / cfg.vit.patch_size


@dataclass
class PARTConfig(InputConfig):
    sampler: str = "offgrid"  # one of SAMPLERS
    num_patches: int = 0  # N; 0 means the grid's count, (H/P)(W/P), the paper's choice
    num_pairs: int = 1024  # K per input; the paper searches {512, 1024, 2048, 4096} (8.1)
    head: str = "cross-attention"  # one of HEADS
    # 0: no position information at all (section 4). > 0: every patch gets the sin-cos embedding of its
    # centre, except a fresh random share that gets none, and the loss is on the pairs with such a one:
    # a reading of 8.1's "mask out 20% of the position embeddings" for 1D pretraining (sleep1d.py).
    pos_mask: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"unknown --sampler {self.sampler!r}, expected one of {SAMPLERS}")
        if self.head not in HEADS:
            raise ConfigError(f"unknown --head {self.head!r}, expected one of {HEADS}")
        check_share("--pos-mask", self.pos_mask)
        grid_n = math.prod(self.grid)
        self.num_patches = self.num_patches or grid_n
        if self.sampler == "grid" and self.num_patches != grid_n:
            raise ConfigError(f"the grid sampler takes all {grid_n} grid patches, not --num-patches {self.num_patches}")
        if self.num_patches > 16 * grid_n:
            raise ConfigError(
                f"--num-patches {self.num_patches} is more than 16 x the {grid_n} grid patches of a "
                f"{'x'.join(map(str, self.img_size))} input (the paper samples as many as the grid has)"
            )
        N, M = self.num_patches, round(self.pos_mask * self.num_patches)
        pairs = N * N - (N - M) ** 2 if self.pos_mask else N * N
        if self.pos_mask and M == 0:
            raise ConfigError(f"--pos-mask {self.pos_mask} masks no patch of {N}")
        if self.num_pairs > pairs:
            raise ConfigError(
                f"--pairs {self.num_pairs} is more than the {pairs} ordered pairs of {N} patches"
                + (f" with one of the {M} masked" if self.pos_mask else "")
            )


class PART(nn.Module):
    """PART pretraining: sample -> encode -> relative head -> loss (section 4, Figure 3)."""

    def __init__(self, cfg: PARTConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = VisionTransformer(cfg.vit)
        self.scale = cfg.sampler == "offgrid-scale"  # also regress the relative sizes
        n_out = len(cfg.img_size) * (2 if self.scale else 1)
        self.relative = relative_head(cfg.head, cfg.vit.embed_dim, cfg.vit.num_heads, cfg.num_patches, n_out)
        self.relative.apply(weight_init(cfg.vit))
        self.normalize = Normalize(cfg.mean, cfg.std, len(cfg.img_size))
        if cfg.pos_mask:  # the embeddings of the on-grid patches, saved for finetuning to start from
            self.register_buffer(
                "fixed_pos_embed", sincos_embed(grid_positions(cfg), cfg.vit.embed_dim)[None]
            )  # (1, N, D)

    def sample(self, images):
        """uint8 or float inputs (B, C, *size) -> patches (B, N, C, *patch), boxes (B, N, 2d)."""
        boxes = sample_boxes(
            len(images), self.cfg.img_size, self.cfg.vit.patch_size, self.cfg.num_patches, self.cfg.sampler,
            images.device,
        )
        return crop_patches(self.normalize(images), boxes, self.cfg.vit.patch_size, self.scale), boxes

    def positions(self, boxes, masked):
        """--pos-mask: the sin-cos embedding of each box centre in patch units, zero for the masked
        boxes, (B, N, D): a masked patch's input says nothing of where it lies."""
        centres, _ = centres_sizes(boxes)  # (B, N, d)
        return sincos_embed(centres / self.cfg.vit.patch_size, self.cfg.vit.embed_dim) * ~masked[..., None]

    def predict(self, patches, pairs, pos=None):
        """Predicted relative translations for given pairs: (B, N, C, *patch), (B, K, 2) -> (B, K, d|2d)."""
        return self.relative(self.encoder.forward_features(patches, pos=pos), pairs)

    def forward(self, images, labels=None):
        """images (B, C, H, W) or signals (B, C, T) -> (loss, metrics). labels are ignored: PART is self-supervised."""
        patches, boxes = self.sample(images)  # (B, N, C, *patch), (B, N, 2d)
        B, N = boxes.shape[:2]
        pos = masked = None
        if self.cfg.pos_mask:
            masked = as_mask(random_split(B, N, self.cfg.pos_mask, images.device)[1], N)  # (B, N)
            pos = self.positions(boxes, masked)
        pairs = sample_pairs(B, N, self.cfg.num_pairs, images.device, masked)  # (B, K, 2)
        pred = self.predict(patches, pairs, pos)  # (B, K, d|2d)
        return relative_loss(pred, relative_targets(boxes, pairs, self.scale), len(self.cfg.img_size))


# ---------------------------------------------------------------- finetuning

POOLS = ("cls", "avg")


@dataclass
class ClassifierConfig(InputConfig):
    """The ViT the paper finetunes (section 4 "Training setup"; 8.1 for 1D): the pretrained encoder
    plus a class token, new learnable position embeddings over the patch grid and a linear head.
    The baselines' own protocols are options: MAE's and DropPos' fc_norm, DropPos' frozen sin-cos,
    MP3's finetuning without position embeddings."""

    num_classes: int = 1000
    pool: str = "cls"  # "cls": the class token (the paper); "avg": mean of the patch tokens
    fc_norm: bool = False  # with pool "avg": a new LayerNorm after the mean instead of the final norm (MAE, DropPos)
    linear_probe: bool = False  # frozen encoder, BatchNorm without affine before the head (MAE)
    smoothing: float = 0.1  # label smoothing (DeiT)
    pos_mask: float = 0.0  # share of patch tokens whose position embedding is masked out in training (8.1, EEG: 0.2)
    pos_pretrained: bool = False  # the encoder was pretrained with position embeddings (MAE, DropPos, PART --pos-mask)
    pos_embed: bool = True  # position embeddings over the patch grid; False: none (MP3's Table 1 row "without")
    freeze_pos_embed: bool = False  # keep the pretrained position embeddings fixed (DropPos' finetuning)

    def __post_init__(self):
        super().__post_init__()
        if self.pool not in POOLS:
            raise ConfigError(f"unknown --pool {self.pool!r}, expected one of {POOLS}")
        if self.fc_norm and self.pool != "avg":
            raise ConfigError("--fc-norm normalises the mean of the patch tokens: it needs --pool avg")
        check_share("--pos-mask", self.pos_mask)
        if not self.pos_embed and (self.pos_mask or self.freeze_pos_embed):
            raise ConfigError(
                "--no-pos-embed leaves no position embeddings to mask (--pos-mask) or freeze (--freeze-pos-embed)"
            )
        if self.freeze_pos_embed and not self.pos_pretrained:
            raise ConfigError(
                "--freeze-pos-embed keeps pretrained position embeddings (MAE's, DropPos') fixed; these weights "
                "bring none"
            )
        # a probed encoder stays as pretrained: with the position embeddings it was pretrained with, if any;
        # random ones it could not adapt to would be noise
        grid = () if not self.pos_embed or (self.linear_probe and not self.pos_pretrained) else self.grid
        self.vit = replace(
            self.vit, class_token=True, pos_grid=grid, num_classes=self.num_classes, pool=self.pool,
            fc_norm=self.fc_norm,
        )


class Classifier(nn.Module):
    """Finetuning and linear probing: on-grid patches -> ViT -> linear head -> cross-entropy.

    Labels are class indices (B,) or soft targets (B, classes), as MixUp / CutMix make them.
    """

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = VisionTransformer(cfg.vit)
        if cfg.linear_probe:  # MAE's probe: only a BatchNorm without affine and the linear head learn
            self.encoder.head = nn.Sequential(
                nn.BatchNorm1d(cfg.vit.embed_dim, affine=False, eps=1e-6), self.encoder.head
            )
            for name, p in self.encoder.named_parameters():
                p.requires_grad = name.startswith("head.")
        if cfg.freeze_pos_embed:  # the class token's slot too: a constant added to a learnt token changes nothing
            self.encoder.pos_embed.requires_grad = False
        self.normalize = Normalize(cfg.mean, cfg.std, len(cfg.img_size))

    def masked_positions(self, B, device):
        """The position embeddings (B, 1 + N, D) with those of a fresh random share of each input's patch tokens
        zeroed. "We randomly mask out 20% of the position embeddings" (8.1) is read as in MP3 / DropPos: in
        training those tokens must be placed by their content; the class token keeps its own."""
        N = math.prod(self.cfg.grid)
        masked = as_mask(random_split(B, N, self.cfg.pos_mask, device)[1], N)  # (B, N)
        keep = torch.cat([torch.ones(B, 1, device=device), (~masked).float()], dim=1)  # (B, 1 + N)
        return self.encoder.pos_embed * keep[..., None]

    def logits(self, images):
        """uint8 or float inputs (B, C, *size) -> logits (B, classes); position masking only in training."""
        pos = self.masked_positions(len(images), images.device) if self.training and self.cfg.pos_mask > 0 else None
        return self.encoder.head(self.encoder.pool(encode_grid(self.encoder, self.normalize, images, pos))).float()

    def forward(self, images, labels):
        """inputs (B, C, *size), labels (B,) or (B, classes) -> (loss, metrics)."""
        logits = self.logits(images)  # (B, classes)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.cfg.smoothing)
        hard = labels if labels.ndim == 1 else labels.argmax(dim=-1)  # a mixed target's dominant class
        acc = (logits.argmax(dim=-1) == hard).float().mean()
        return loss, {"loss": loss.detach(), "acc": acc}


def encode_grid(encoder, normalize, inputs, pos=None):
    """uint8 or float inputs (B, C, *size) -> the encoder's tokens (B, T, D) of their on-grid patches in
    raster order (feature_map makes them a map), with its own position embeddings unless pos is given."""
    return encoder.forward_features(patchify(normalize(inputs), encoder.cfg.patch_size), pos)


def knn_predict(bank, bank_labels, queries, k=20, temperature=0.07, chunk=1024):
    """DINO's weighted k-nearest-neighbour classifier on L2-normalised features: each of a query's
    k most cosine-similar bank features votes for its class with weight exp(similarity / temperature).
    bank (M, D), bank_labels (M,), queries (Q, D) -> predicted classes (Q,)."""
    classes = int(bank_labels.max()) + 1
    preds = []
    for q in queries.split(chunk):
        sim, idx = (q @ bank.T).topk(k, dim=1)  # (q, k) the nearest neighbours
        votes = torch.zeros(len(q), classes, device=q.device).scatter_add_(
            1, bank_labels[idx], (sim / temperature).exp()
        )
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)
