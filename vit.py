"""The Vision Transformer that every method here trains, in timm / DINO parameter names (as DINO's
vision_transformer.py). It reads patches from anywhere (PART's crops, `patchify`'s grid), adds a class token and
position embeddings only when its config asks (finetuning); ViTDet's windows serve detect.py, a key/value context MP3.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


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
    fc_norm: bool = False  # with "avg": a new LayerNorm after the mean instead of the final norm (MAE's global pool)
    xavier_init: bool = False  # --xavier-init: every Linear xavier-uniform (MAE's, DropPos' init); else DeiT's


PRESETS = {  # widths and depths of DeiT / timm
    "vit_test": dict(embed_dim=32, depth=2, num_heads=2),  # for the test suite only
    "vit_mini": dict(embed_dim=128, depth=4, num_heads=4),  # CPU-sized default
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_s": dict(embed_dim=384, depth=12, num_heads=6),  # the paper's CIFAR-100 backbone (ViT-S/4)
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12),  # the paper's ImageNet / COCO backbone (ViT-B/16)
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16),  # the baselines' ViT-L rows (MAE, DropPos)
}


def vit_config(preset, **overrides):
    return ViTConfig(**{**PRESETS[preset], **overrides})


def patchify(images, P):
    """On-grid patches in raster order: (B, C, H, W) -> (B, N, C, P, P); signals (B, C, T) -> (B, T/P, C, P)."""
    if images.ndim == 3:
        B, C, T = images.shape
        return images.reshape(B, C, T // P, P).transpose(1, 2)
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // P, P, W // P, P)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // P) * (W // P), C, P, P)


def take_rows(table, index):
    """Rows of a per-item table: (B, N, M), (B, K) -> (B, K, M), row index[b, k] of table[b]."""
    return torch.gather(table, 1, index[..., None].expand(-1, -1, table.shape[-1]))


class Attention(nn.Module):
    """Multi-head attention: self-attention on x, or cross-attention from x to ctx. With window > 0 and the
    token grid given, within window x window blocks of the grid (ViTDet, without its relative position biases)."""

    def __init__(self, dim, num_heads, window=0):
        super().__init__()
        self.num_heads, self.window = num_heads, window
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, ctx=None, grid=None):
        """x (B, N, D), ctx (B, M, D) -> (B, N, D)."""
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
    """(B, h, w, D) -> (B * windows, window * window, D); the zero padding to whole windows takes part (ViTDet)."""
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
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

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
        """x (B, N, D) -> (B, N, D). context (B, M), optional: the only tokens that give keys and values (MP3)."""
        h = self.norm1(x)
        x = x + self.drop_path(self.attn(h, ctx=None if context is None else take_rows(h, context), grid=grid))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Linear embedding of patches already cut out: (B, N, C, *patch) -> (B, N, D). Stored as timm's Conv2d
    (Conv1d for windows) so checkpoints load into timm, applied as a matmul as the patches come from anywhere."""

    def __init__(self, patch_size, in_chans, dim, patch_ndim=2):
        super().__init__()
        conv = nn.Conv2d if patch_ndim == 2 else nn.Conv1d
        self.proj = conv(in_chans, dim, patch_size, patch_size)

    def forward(self, patches):
        return F.linear(patches.flatten(2), self.proj.weight.flatten(1), self.proj.bias)


class VisionTransformer(nn.Module):
    """A ViT over a sequence of patches. Without class token and position embeddings (PART's pretraining)
    it is permutation-equivariant in its patches; finetuning adds both and a linear head."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, D, cfg.patch_ndim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.class_token else None
        num_pos = math.prod(cfg.pos_grid) + int(cfg.class_token)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_pos, D)) if cfg.pos_grid else None
        rates = torch.linspace(0, cfg.drop_path, cfg.depth).tolist()
        windows = [0 if i in cfg.global_blocks else cfg.window for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(D, cfg.num_heads, cfg.mlp_ratio, r, w) for r, w in zip(rates, windows))
        self.norm = nn.Identity() if cfg.fc_norm else nn.LayerNorm(D, eps=1e-6)  # MAE drops it for fc_norm
        self.fc_norm = nn.LayerNorm(D, eps=1e-6) if cfg.fc_norm else None
        self.head = nn.Linear(D, cfg.num_classes) if cfg.num_classes else nn.Identity()
        self.grad_checkpointing = False  # timm's name; a memory setting, not part of the model
        self.apply(weight_init(cfg))
        for p in (self.cls_token, self.pos_embed):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)  # timm's init for tokens and position embeddings

    def position_embedding(self, grid=None):
        """The learnable position embeddings (1, T, D), resized to the token grid `grid` if given; None if none."""
        if self.pos_embed is None or grid is None:
            return self.pos_embed
        return resize_pos_embed(self.pos_embed, self.cfg.pos_grid, grid, int(self.cfg.class_token))

    def forward_features(self, patches, pos=None, grid=None, context=None):
        """(B, N, C, *patch) -> tokens (B, T, D), T = N (+1 with a class token first). pos (B or 1, T, D): the
        caller's position embeddings, else the encoder's own; grid (h, w): the token grid (windows, resized
        embeddings; detection); context (B, M): the tokens that alone give keys and values (MP3)."""
        x = self.patch_embed(patches)  # (B, N, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        pos = self.position_embedding(grid) if pos is None else pos
        if pos is not None:
            x = x + pos.to(x.dtype)
        return self.norm(run_blocks(self.blocks, x, self.grad_checkpointing, grid, context))

    def pool(self, tokens, how=None):
        """Tokens (B, T, D) -> (B, D): the class token ("cls") or the patch tokens' mean ("avg"), then fc_norm."""
        how = how or self.cfg.pool
        if how == "cls":
            return tokens[:, 0]
        pooled = tokens[:, int(self.cfg.class_token) :].mean(dim=1)
        return pooled if self.fc_norm is None else self.fc_norm(pooled)

    def forward(self, patches, pos=None):
        """(B, N, C, *patch) -> logits (B, classes), or pooled features (B, D) without a head."""
        return self.head(self.pool(self.forward_features(patches, pos)))


def run_blocks(blocks, x, checkpointed=False, grid=None, context=None):
    """x through the blocks (grid, context: as Block's). checkpointed: recompute each block's activations in
    backward instead of keeping them (less memory; drop path's draws replay, so the gradients are the same)."""
    for block in blocks:
        if checkpointed and torch.is_grad_enabled():
            x = checkpoint(block, x, grid, context, use_reentrant=False)
        else:
            x = block(x, grid, context)
    return x


def set_grad_checkpointing(model, on=True):
    """Activation checkpointing (run_blocks) on or off in every ViT of `model`."""
    for m in model.modules():
        if isinstance(m, VisionTransformer):
            m.grad_checkpointing = on


def weight_init(vit):
    """The init of a model on the ViT `vit` (ViTConfig): DeiT's trunc-normal, or MAE's xavier with --xavier-init."""
    return xavier_init if vit.xavier_init else _init_weights


def xavier_init(m):
    """MAE's and DropPos' init (models_mae.py `_init_weights`): every Linear xavier-uniform, the fused qkv as one."""
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
    """Position embeddings interpolated to another token grid (bicubic in 2D, linear in 1D), the class token's
    kept: (1, num_prefix + prod(old_grid), D) -> (1, num_prefix + prod(new_grid), D)."""
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    grid = feature_map(grid, old_grid)  # (1, D, *old_grid)
    mode = "bicubic" if len(old_grid) == 2 else "linear"
    grid = F.interpolate(grid.float(), size=tuple(new_grid), mode=mode, align_corners=False).to(pos_embed.dtype)
    return torch.cat([prefix, grid.flatten(2).transpose(1, 2)], dim=1)


def sincos_embed(coords, dim):
    """Fixed sin-cos position embeddings of continuous coordinates (MAE's 2D form, any d): (..., d) -> (..., dim),
    dim / d channels per coordinate, half sines, half cosines, at frequencies 10000^(-k / (dim / 2d))."""
    d = coords.shape[-1]
    n = dim // (2 * d)
    freq = 10000.0 ** (-torch.arange(n, device=coords.device, dtype=torch.float) / n)  # (n,)
    angles = coords[..., None].float() * freq  # (..., d, n)
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # (..., d * 2n)
    return F.pad(emb, (0, dim - emb.shape[-1]))  # zero-padded to dim
