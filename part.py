"""PART: Ayoughi et al., "How PARTs assemble into wholes: learning the relative composition of images",
NLDL 2026, section 4 (method) and 8.1 (details), read top-down:

    sample N boxes -> crop-and-resize to P x P -> ViT without position embeddings (vit.py)
    -> cross-attention head on K (reference, target) pairs -> MSE on the relative translation

Then Table 5's other heads, the classifier that finetunes any encoder, and kNN (weights in and out: weights.py).
Images (B, C, H, W) take boxes (x0, y0, x1, y1); signals (B, C, T) windows (t0, t1) (sleep1d.py).

    python train.py pretrain          # PART on Fashion-MNIST
"""

import math
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine import UserError
from vit import ViTConfig, VisionTransformer, patchify, sincos_embed, take_rows, weight_init


# ---------------------------------------------------------------- the sampler (section 4 "Sampling")

SAMPLERS = ("offgrid", "offgrid-scale", "grid")


def grid_boxes(size, P, device=None):
    """The non-overlapping grid in raster order, (N, 2d) as (lo, hi) per coordinate: x0, y0, x1, y1 or t0, t1."""
    axes = [torch.arange(0, s, P, device=device, dtype=torch.float) for s in size]  # rows first: y, then x
    lo = torch.stack([a.flatten() for a in torch.meshgrid(*axes, indexing="ij")][::-1], dim=1)  # (N, d) as x, y
    return torch.cat([lo, lo + P], dim=1)


def sample_boxes(B, size, P, N, mode, device=None):
    """N boxes per input, (B, N, 2d) float pixels; size is (H, W), or (T,) for signals."""
    if mode == "grid":  # PART-grid (Table 4): the grid in a random order per input
        boxes = grid_boxes(size, P, device)  # (N, 2d)
        order = torch.rand(B, boxes.shape[0], device=device).argsort(dim=1)  # a permutation per input
        return boxes[order]
    extent = torch.tensor(size[::-1], device=device, dtype=torch.float)  # (d,) as x, y
    if mode == "offgrid":  # the paper's: P-sided boxes anywhere
        sides = torch.full((B, N, len(size)), float(P), device=device)
    else:  # offgrid-scale, 5.1 ii: each side uniform in [P/2, 2P]
        sides = torch.minimum(torch.empty(B, N, len(size), device=device).uniform_(P / 2, 2 * P), extent)
    lo = torch.rand(B, N, len(size), device=device) * (extent - sides)  # uniform over the positions that fit
    return torch.cat([lo, lo + sides], dim=-1)


def crop_patches(images, boxes, P, scaled=False):
    """Every box cropped and resized to P a side: (B, C, H, W), (B, N, 4) -> (B, N, C, P, P); signals (B, C, T),
    windows (B, N, 2) -> (B, N, C, P). One bilinear sample per pixel returns an integer box's pixels exactly;
    scaled boxes average ceil(size / P) samples per pixel instead of aliasing."""
    from torchvision.ops import roi_align  # here: torchvision brings PIL and datasets, which part.py needs not

    if images.ndim == 3:
        zero = torch.zeros_like(boxes[..., :1])
        rows = torch.cat([boxes[..., :1], zero, boxes[..., 1:], zero + 1], dim=-1)  # (B, N, 4)
        return crop_patches(images[:, :, None], rows, (1, P), scaled).squeeze(-2)  # (B, N, C, P)
    B, N, _ = boxes.shape
    C = images.shape[1]
    index = torch.arange(B, device=boxes.device, dtype=boxes.dtype).repeat_interleave(N)[:, None]
    rois = torch.cat([index, boxes.reshape(B * N, 4)], dim=1)  # (B*N, 5): batch index, x0, y0, x1, y1
    ratio = -1 if scaled else 1
    patches = roi_align(images, rois.to(images.dtype), P, spatial_scale=1.0, sampling_ratio=ratio, aligned=True)
    return patches.reshape(B, N, C, *patches.shape[-2:])


def random_split(B, N, ratio, device=None):
    """A fresh random split of N tokens per item -> kept (B, N - M), dropped (B, M) indices, M = round(ratio N)
    (PART's --pos-mask, MAE's masking, DropPos' position dropping)."""
    order = torch.rand(B, N, device=device).argsort(dim=1)
    M = round(ratio * N)
    return order[:, : N - M], order[:, N - M :]


def as_mask(index, N):
    """Indices (B, M) -> a boolean mask (B, N), True at them."""
    return torch.zeros(index.shape[0], N, dtype=torch.bool, device=index.device).scatter_(1, index, True)


# ---------------------------------------------------------------- pairs and targets (section 4 "Objective")


def sample_pairs(B, N, K, device=None, masked=None):
    """K distinct ordered (reference, target) pairs per item, (B, K, 2), from all N*N: CIFAR's 64 patches
    give the paper's 4096 pairs only with a patch paired with itself. masked (B, N): only pairs with a masked
    member (--pos-mask; PARTConfig checked there are K, as reading a count back would break a compiled graph)."""
    if K > N * N:
        raise UserError(f"--pairs {K} is more than the {N * N} ordered pairs of {N} patches")
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
    """(c_tgt - c_ref) / s_ref of centres c, sizes s, and with scale s_tgt / s_ref: boxes (B, N, 2d),
    pairs (B, K, 2) -> (B, K, d|2d). Float: rounding would erase the off-grid signal."""
    d = boxes.shape[-1] // 2
    centre, size = centres_sizes(boxes)  # (B, N, d) each
    take = lambda t, i: torch.gather(t, 1, pairs[..., i : i + 1].expand(-1, -1, d))  # noqa: E731 (B, K, d)
    c_ref, c_tgt, s_ref, s_tgt = take(centre, 0), take(centre, 1), take(size, 0), take(size, 1)
    shift = (c_tgt - c_ref) / s_ref
    return torch.cat([shift, s_tgt / s_ref], dim=-1) if scale else shift


# ---------------------------------------------------------------- the relative encoder (section 4)


def gather_pairs(x, pairs):
    """Both members of each pair concatenated: (B, N, D), (B, K, 2) -> (B, K, 2D)."""
    B, N, D = x.shape
    K = pairs.shape[1]
    picked = torch.gather(x, 1, pairs.reshape(B, 2 * K, 1).expand(-1, -1, D))  # (B, 2K, D)
    return picked.reshape(B, K, 2 * D)


class CrossAttentionHead(nn.Module):
    """The paper's relative encoder (section 4), for K (reference, target) pairs of the ViT's tokens X' (N, D):

        q     = W [x_ref ; x_tgt] + b                   (K, D)      the pair's query
        theta = R softmax(q X'^T / sqrt(D)) X' + r      (K, n_out)  X' as keys and values, then a regressor
    """

    def __init__(self, dim, n_out):
        super().__init__()
        self.query = nn.Linear(2 * dim, dim)  # W, b
        self.regressor = nn.Linear(dim, n_out)  # R, r

    def forward(self, x, pairs):
        """The equation as written, pair by pair: x (B, N, D), pairs (B, K, 2) -> (B, K, n_out)."""
        q = self.query(gather_pairs(x, pairs))  # (B, K, D)
        attn = (q @ x.transpose(1, 2) / math.sqrt(x.shape[-1])).softmax(dim=-1)  # (B, K, N)
        return self.regressor(attn @ x)  # (B, K, n_out)

    def fast(self, x, pairs):
        """forward rearranged so that no map runs per pair (what PART trains with; tested equal). W = [W_ref W_tgt]
        splits q X'^T into rows of two N x N tables, (X' W_ref^T X'^T)[ref] + (X' W_tgt^T X'^T)[tgt] + b X'^T;
        A's rows sum to one, so R (A X') + r = A (X' R^T + r). A pair costs O(N n_out), not O(N D + D^2)."""
        B, N, D = x.shape
        w = self.query.weight.view(D, 2, D).transpose(0, 1).reshape(2 * D, D) / math.sqrt(D)  # [W_ref; W_tgt] / sqrt(D)
        q = F.linear(x, w).view(B, N, 2, D).transpose(1, 2).reshape(B, 2 * N, D)  # W_ref x_i, then W_tgt x_i
        tables = q @ x.transpose(1, 2)  # (B, 2N, N): row i (N + i) scores every key for token i as ref (tgt)
        rows = pairs + torch.tensor([0, N], device=pairs.device)  # (B, K, 2): each pair's rows in the tables
        scores = take_rows(tables, rows.reshape(B, -1)).view(B, -1, 2, N).sum(dim=2)  # (B, K, N)
        scores = scores + (x @ self.query.bias / math.sqrt(D))[:, None]  # + b . x_j / sqrt(D)
        return scores.softmax(dim=-1) @ self.regressor(x)  # (B, K, N) @ (B, N, n_out)


# ---------------------------------------------------------------- the loss


def relative_loss(pred, target, d=2):
    """MSE over pairs and coordinates (section 4), in fp32 -> (loss, metrics): Table 5's errors (8.1) over the d
    translation coordinates in reference sizes (mse_x, mae_x, ..., euclid) and euclid_zero, that of no shift."""
    pred = pred.float()
    loss = F.mse_loss(pred, target)
    err = (pred.detach()[..., :d] - target[..., :d]).float()
    metrics = {"loss": loss.detach()}
    for k, axis in zip(range(d), "xy"):
        metrics[f"mse_{axis}"] = err[..., k].square().mean()
        metrics[f"mae_{axis}"] = err[..., k].abs().mean()
    metrics["euclid"] = err.norm(dim=-1).mean()
    metrics["euclid_zero"] = target[..., :d].float().norm(dim=-1).mean()
    return loss, metrics


# ---------------------------------------------------------------- PART


@dataclass
class InputConfig:
    """What every model here reads: its ViT and its inputs' size and statistics, checked against each other."""

    vit: ViTConfig = field(default_factory=ViTConfig)  # a dict after a checkpoint round trip
    img_size: tuple = (224, 224)  # (H, W) pixels, or (T,) samples for 1D signals
    mean: tuple = (0.485, 0.456, 0.406)  # input normalisation, per channel
    std: tuple = (0.229, 0.224, 0.225)

    def __post_init__(self):
        self.vit = ViTConfig(**self.vit) if isinstance(self.vit, dict) else self.vit
        self.img_size, P, d = tuple(self.img_size), self.vit.patch_size, self.vit.patch_ndim
        if len(self.img_size) != d:
            raise UserError(f"a {d}D ViT takes inputs of {d} dimensions, not {self.img_size}")
        if any(s % P for s in self.img_size):
            raise UserError(f"--patch-size {P} must divide the input size {'x'.join(map(str, self.img_size))}")
        self.mean, self.std = check_stats(self.mean, self.std, self.vit.in_chans)

    @property
    def grid(self):
        """The token grid of on-grid patches, (H/P, W/P) or (T/P,)."""
        return tuple(s // self.vit.patch_size for s in self.img_size)

    def to_dict(self):
        return asdict(self)


HEADS = ("cross-attention", "pairwise-mlp", "mlp")  # Table 5


@dataclass
class PARTConfig(InputConfig):
    sampler: str = "offgrid"  # one of SAMPLERS
    num_patches: int = 0  # N; 0 means the grid's count, (H/P)(W/P), the paper's choice
    num_pairs: int = 1024  # K per input; the paper searches {512, 1024, 2048, 4096} (8.1)
    head: str = "cross-attention"  # one of HEADS
    # 0: no position information (section 4). > 0: each patch gets its centre's sin-cos embedding but a fresh
    # random share, and the loss is on pairs with such a patch: 8.1's "mask out 20%" read for 1D (sleep1d.py)
    pos_mask: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.sampler not in SAMPLERS:
            raise UserError(f"unknown --sampler {self.sampler!r}, expected one of {SAMPLERS}")
        if self.head not in HEADS:
            raise UserError(f"unknown --head {self.head!r}, expected one of {HEADS}")
        check_share("--pos-mask", self.pos_mask)
        grid_n = math.prod(self.grid)
        self.num_patches = self.num_patches or grid_n
        if self.sampler == "grid" and self.num_patches != grid_n:
            raise UserError(f"the grid sampler takes all {grid_n} grid patches, not --num-patches {self.num_patches}")
        if self.num_patches > 16 * grid_n:
            raise UserError(f"--num-patches {self.num_patches} is more than 16 x the {grid_n} grid patches of a "
                            f"{'x'.join(map(str, self.img_size))} input (the paper samples as many as the grid has)")
        N, M = self.num_patches, round(self.pos_mask * self.num_patches)
        pairs = N * N - (N - M) ** 2 if self.pos_mask else N * N
        if self.pos_mask and M == 0:
            raise UserError(f"--pos-mask {self.pos_mask} masks no patch of {N}")
        if self.num_pairs > pairs:
            masked = f" with one of the {M} masked" if self.pos_mask else ""
            raise UserError(f"--pairs {self.num_pairs} is more than the {pairs} ordered pairs of {N} patches{masked}")


class PART(nn.Module):
    """PART pretraining: sample -> encode -> relative head -> loss (section 4, Figure 3)."""

    def __init__(self, cfg: PARTConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = VisionTransformer(cfg.vit)
        self.scale = cfg.sampler == "offgrid-scale"  # also regress the relative sizes
        n_out = len(cfg.img_size) * (2 if self.scale else 1)
        self.relative = relative_head(cfg.head, cfg.vit.embed_dim, cfg.num_patches, n_out)
        self.relative.apply(weight_init(cfg.vit))
        self.normalize = Normalize(cfg.mean, cfg.std, len(cfg.img_size))
        if cfg.pos_mask:  # the on-grid patches' embeddings (1, N, D), saved for finetuning to start from
            self.register_buffer("fixed_pos_embed", sincos_embed(grid_positions(cfg), cfg.vit.embed_dim)[None])

    def sample(self, images):
        """uint8 or float inputs (B, C, *size) -> patches (B, N, C, *patch), boxes (B, N, 2d)."""
        cfg = self.cfg
        boxes = sample_boxes(len(images), cfg.img_size, cfg.vit.patch_size, cfg.num_patches, cfg.sampler, images.device)
        return crop_patches(self.normalize(images), boxes, cfg.vit.patch_size, self.scale), boxes

    def positions(self, boxes, masked):
        """--pos-mask: each box centre's sin-cos embedding in patch units, (B, N, D), zero where masked."""
        centres, _ = centres_sizes(boxes)  # (B, N, d)
        return sincos_embed(centres / self.cfg.vit.patch_size, self.cfg.vit.embed_dim) * ~masked[..., None]

    def predict(self, patches, pairs, pos=None):
        """Relative translations of the pairs: (B, N, C, *patch), (B, K, 2) -> (B, K, d|2d)."""
        return self.relative.fast(self.encoder.forward_features(patches, pos=pos), pairs)

    def forward(self, images, labels=None):
        """images (B, C, H, W) or signals (B, C, T) -> (loss, metrics); self-supervised, so labels go unused."""
        patches, boxes = self.sample(images)  # (B, N, C, *patch), (B, N, 2d)
        B, N = boxes.shape[:2]
        pos = masked = None
        if self.cfg.pos_mask:
            masked = as_mask(random_split(B, N, self.cfg.pos_mask, images.device)[1], N)  # (B, N)
            pos = self.positions(boxes, masked)
        pairs = sample_pairs(B, N, self.cfg.num_pairs, images.device, masked)  # (B, K, 2)
        pred = self.predict(patches, pairs, pos)  # (B, K, d|2d)
        return relative_loss(pred, relative_targets(boxes, pairs, self.scale), len(self.cfg.img_size))


# ---------------------------------------------------------------- inputs, checked and normalised


def check_stats(mean, std, in_chans):
    """Input statistics as tuples, one value per channel -> (mean, std)."""
    mean, std = tuple(mean), tuple(std)
    if not len(mean) == len(std) == in_chans:
        raise UserError(f"mean {mean} and std {std} need one value per input channel, {in_chans}")
    return mean, std


def check_share(name, value):
    if not 0 <= value < 1:
        raise UserError(f"{name} {value} must be in [0, 1)")


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


def grid_positions(cfg: InputConfig):
    """The centres of the on-grid patches in raster order, in patch units, (N, d) as x, y."""
    centres, _ = centres_sizes(grid_boxes(cfg.img_size, cfg.vit.patch_size))
    return centres / cfg.vit.patch_size


# ---------------------------------------------------------------- Table 5's other relative encoders


class PairwiseMlpHead(nn.Module):
    """Table 5's pairwise MLP: one linear map of the concatenated pair, the paper's 2*d*2 weights; it sees only
    the pair's two patches."""

    def __init__(self, dim, n_out):
        super().__init__()
        self.linear = nn.Linear(2 * dim, n_out)

    def forward(self, x, pairs):
        """x (B, N, D), pairs (B, K, 2) -> (B, K, n_out), pair by pair."""
        return self.linear(gather_pairs(x, pairs))

    def fast(self, x, pairs):
        """forward as W_ref x_ref + W_tgt x_tgt + b, both halves run on the N tokens and gathered."""
        w_ref, w_tgt = self.linear.weight.split(x.shape[-1], dim=1)  # (n_out, D) each
        return take_rows(x @ w_ref.T, pairs[..., 0]) + take_rows(x @ w_tgt.T, pairs[..., 1]) + self.linear.bias


class MlpHead(nn.Module):
    """Table 5's fully connected MLP: all N embeddings flattened, one linear map to every ordered pair's output,
    the paper's N*d*N^2*2 weights, none shared."""

    def __init__(self, dim, num_patches, n_out):
        super().__init__()
        self.n_out = n_out
        self.linear = nn.Linear(num_patches * dim, num_patches * num_patches * n_out)

    def forward(self, x, pairs):
        """x (B, N, D), pairs (B, K, 2) -> (B, K, n_out)."""
        B, N, D = x.shape
        every = self.linear(x.reshape(B, N * D)).reshape(B, N * N, self.n_out)  # (B, N*N, n_out)
        return take_rows(every, pairs[..., 0] * N + pairs[..., 1])

    fast = forward  # it maps the image once, never a pair


def relative_head(kind, dim, num_patches, n_out):
    """Table 5's head `kind` (one of HEADS, PARTConfig checked)."""
    if kind == "mlp":
        return MlpHead(dim, num_patches, n_out)
    return {"cross-attention": CrossAttentionHead, "pairwise-mlp": PairwiseMlpHead}[kind](dim, n_out)


# ---------------------------------------------------------------- finetuning and kNN

POOLS = ("cls", "avg")


@dataclass
class ClassifierConfig(InputConfig):
    """The ViT the paper finetunes (section 4 "Training setup"; 8.1 for 1D): the pretrained encoder with a
    class token, new learnable position embeddings and a linear head; the baselines' protocols as options."""

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
            raise UserError(f"unknown --pool {self.pool!r}, expected one of {POOLS}")
        if self.fc_norm and self.pool != "avg":
            raise UserError("--fc-norm normalises the mean of the patch tokens: it needs --pool avg")
        check_share("--pos-mask", self.pos_mask)
        if not self.pos_embed and (self.pos_mask or self.freeze_pos_embed):
            raise UserError("--no-pos-embed leaves no position embeddings to mask (--pos-mask) or freeze "
                            "(--freeze-pos-embed)")
        if self.freeze_pos_embed and not self.pos_pretrained:
            raise UserError("--freeze-pos-embed keeps pretrained position embeddings (MAE's, DropPos') fixed; "
                            "these weights bring none")
        # a probed encoder keeps the positions it was pretrained with, if any: random ones it cannot adapt to are noise
        grid = () if not self.pos_embed or (self.linear_probe and not self.pos_pretrained) else self.grid
        self.vit = replace(self.vit, class_token=True, pos_grid=grid, num_classes=self.num_classes, pool=self.pool,
                           fc_norm=self.fc_norm)


class Classifier(nn.Module):
    """Finetuning and linear probing: on-grid patches -> ViT -> linear head -> cross-entropy against class
    indices (B,) or the soft targets (B, classes) of MixUp / CutMix."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = VisionTransformer(cfg.vit)
        if cfg.linear_probe:  # MAE's probe: only a BatchNorm without affine and the linear head learn
            probe_norm = nn.BatchNorm1d(cfg.vit.embed_dim, affine=False, eps=1e-6)
            self.encoder.head = nn.Sequential(probe_norm, self.encoder.head)
            for name, p in self.encoder.named_parameters():
                p.requires_grad = name.startswith("head.")
        if cfg.freeze_pos_embed:  # the class token's slot too: a constant added to a learnt token changes nothing
            self.encoder.pos_embed.requires_grad = False
        self.normalize = Normalize(cfg.mean, cfg.std, len(cfg.img_size))

    def logits(self, images):
        """uint8 or float inputs (B, C, *size) -> logits (B, classes). In training with --pos-mask a fresh share of
        the patch tokens' positions is zeroed (8.1's "mask out 20%"): those must be placed by their content."""
        pos = None
        if self.training and self.cfg.pos_mask > 0:
            B, N = len(images), math.prod(self.cfg.grid)
            masked = as_mask(random_split(B, N, self.cfg.pos_mask, images.device)[1], N)  # (B, N)
            keep = torch.cat([torch.ones(B, 1, device=images.device), (~masked).float()], dim=1)  # (B, 1 + N)
            pos = self.encoder.pos_embed * keep[..., None]  # (B, 1 + N, D), the class token's kept
        return self.encoder.head(self.encoder.pool(encode_grid(self.encoder, self.normalize, images, pos))).float()

    def forward(self, images, labels):
        """inputs (B, C, *size), labels (B,) or (B, classes) -> (loss, metrics)."""
        logits = self.logits(images)  # (B, classes)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.cfg.smoothing)
        hard = labels if labels.ndim == 1 else labels.argmax(dim=-1)  # a mixed target's dominant class
        acc = (logits.argmax(dim=-1) == hard).float().mean()
        return loss, {"loss": loss.detach(), "acc": acc}


def encode_grid(encoder, normalize, inputs, pos=None):
    """uint8 or float inputs (B, C, *size) -> the encoder's tokens (B, T, D) of their on-grid patches in raster
    order, with its own position embeddings unless pos is given."""
    return encoder.forward_features(patchify(normalize(inputs), encoder.cfg.patch_size), pos)


def knn_predict(bank, bank_labels, queries, k=20, temperature=0.07, chunk=1024):
    """DINO's weighted kNN on L2-normalised features: each of the k most similar bank features votes for its
    class with weight exp(similarity / temperature). bank (M, D), bank_labels (M,), queries (Q, D) -> (Q,)."""
    classes = int(bank_labels.max()) + 1
    preds = []
    for q in queries.split(chunk):
        sim, idx = (q @ bank.T).topk(k, dim=1)  # (q, k) the nearest neighbours
        weight = (sim / temperature).exp()  # (q, k)
        votes = torch.zeros(len(q), classes, device=q.device).scatter_add_(1, bank_labels[idx], weight)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)
