"""What PART learned (paper section 5.1), end to end: the numbers and their figures.

    reconstruction   Figure 4: the patches at their true places and where one reference puts them
    uncertainty      Figure 5: one target placed from every reference, and every patch's spread
    symmetry         Figure 6: the N x N matrices of predicted dx, dy (dw, dh) beside the truth
    errors           the placement errors of every pair, beside those of putting each patch on its reference

    python train.py show --ckpt out/pretrain/checkpoint.pt [--image photo.jpg]

Also `plot_runs` (curves from log.jsonl). Images are (C, H, W) floats in [0, 1], boxes pixels.
"""

import json
import math
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.patches import Rectangle

import part
from engine import UserError

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402 (after the backend is chosen)

# ---------------------------------------------------------------- what PART learned (section 5.1, Figures 4-6)
# For one image all N*N ordered pairs are predicted: pred[i, j] = target j relative to reference i.


def all_pairs(N, device=None):
    """Every ordered (reference, target) pair, reference-major: (N*N, 2), row i*N + j = (i, j)."""
    ref, tgt = torch.meshgrid(torch.arange(N, device=device), torch.arange(N, device=device), indexing="ij")
    return torch.stack([ref.flatten(), tgt.flatten()], dim=1)


@torch.no_grad()
def predict_all_pairs(model, patches, chunk=4096):
    """A PART's predictions for all ordered pairs, the patches encoded once and the pairs in chunks:
    (B, N, C, P, P) -> (B, N, N, 2|4)."""
    B, N = patches.shape[:2]
    x = model.encoder.forward_features(patches)  # (B, N, D)
    pairs = all_pairs(N, patches.device).expand(B, -1, -1)  # (B, N*N, 2)
    pred = torch.cat([model.relative.fast(x, pairs[:, k : k + chunk]) for k in range(0, N * N, chunk)], dim=1)
    return pred.float().reshape(B, N, N, -1)


def all_pair_targets(boxes, scale=False):
    """The ground truth for all ordered pairs of one image's boxes: (N, 4) -> (N, N, 2|4)."""
    N = boxes.shape[0]
    return part.relative_targets(boxes[None], all_pairs(N, boxes.device)[None], scale).reshape(N, N, -1)


def off_diagonal(m):
    """The entries (i, j), i != j, of (N, N, ...) in row-major order -> (N*(N-1), ...)."""
    return m[~torch.eye(m.shape[0], dtype=torch.bool, device=m.device)]


def placed_boxes(boxes, pred):
    """Where each reference puts each target (Figure 4): boxes (N, 4), pred (N, N, 2|4) -> (N, N, 4): box i's centre
    moved by the shift times box i's size, sized by the predicted relative size (offgrid-scale) or box i's own."""
    centre, size = part.centres_sizes(boxes)  # (N, 2) each
    shift, rel_size = pred[..., :2], pred[..., 2:]  # (N, N, 2), (N, N, 0|2)
    new_centre = centre[:, None] + shift * size[:, None]  # (N, N, 2)
    new_size = size[:, None] * rel_size if rel_size.shape[-1] else size[:, None].expand_as(shift)
    return torch.cat([new_centre - new_size / 2, new_centre + new_size / 2], dim=-1)


def placement_errors(boxes, placed):
    """Pixel distance of every placed centre from its target's true centre: (N, 4), (N, N, 4) -> (N, N)."""
    return (part.centres_sizes(placed)[0] - part.centres_sizes(boxes)[0][None]).norm(dim=-1)


def patch_uncertainty(placed):
    """Each patch's uncertainty (Figure 5): the RMS distance, in pixels, of the N-1 centres that the
    other patches predict for it from their mean. placed (N, N, 4) -> (N,)."""
    N = placed.shape[0]
    centres = off_diagonal(part.centres_sizes(placed)[0].transpose(0, 1)).reshape(N, N - 1, 2)  # [j]: from every i
    return (centres - centres.mean(dim=1, keepdim=True)).square().sum(dim=-1).mean(dim=1).sqrt()


def pearson(a, b):
    """Pearson correlation of two equally long tensors, a float; 0 when either is constant."""
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return (a @ b / (a.norm() * b.norm()).clamp_min(1e-12)).item()


OUTPUT_NAMES = ("dx", "dy", "dw", "dh")


def correlations(a, b):
    """Per output, the correlation of a and b over the pairs i != j: (N, N, k) twice -> {"dx": r, ...}."""
    names = OUTPUT_NAMES[: a.shape[-1]]
    return {name: pearson(off_diagonal(a[..., k]), off_diagonal(b[..., k])) for k, name in enumerate(names)}


def symmetry_scores(pred):
    """Negative symmetry (Figure 6) of all-pair predictions (N, N, 2|4): {"dx", "dy"(, "dw", "dh")}, each
    corr(P, -P^T) over i != j, 1 for a perfectly symmetric model. With offgrid-scale shifts are in the reference's
    size, dx_ij = -dx_ji * dw_ij, and sizes multiply, dw_ij * dw_ji = 1: scored as log dw_ij = -log dw_ji."""
    shift, rel_size = pred[..., :2], pred[..., 2:]
    if not rel_size.shape[-1]:
        return correlations(shift, -shift.transpose(0, 1))
    log_size = rel_size.clamp_min(1e-3).log()  # a size predicted <= 0 counts as tiny
    mirror = torch.cat([-shift.transpose(0, 1) * rel_size, -log_size.transpose(0, 1)], dim=-1)
    return correlations(torch.cat([shift, log_size], dim=-1), mirror)


def raster_order(boxes, P):
    """Patch indices from top-left to bottom-right (Figure 6): rows of height P by centre, then left to right."""
    centre = part.centres_sizes(boxes)[0]  # (N, 2)
    order = centre[:, 0].argsort()
    return order[(centre[order, 1] // P).argsort(stable=True)]


# ---------------------------------------------------------------- the drawings

PANEL, DPI = 3.0, 100  # 300 x 300 pixels per panel
REFERENCE_COLOUR = "red"
TARGET_COLOURS = ("tab:orange", "gold", "tab:cyan", "tab:pink")  # the paper's Figure 5: orange, then yellow


def figure(cols, rows=1):
    """A figure of cols x rows panels, (cols * PANEL * DPI, rows * PANEL * DPI) pixels, and its (rows, cols) axes."""
    return plt.subplots(rows, cols, figsize=(cols * PANEL, rows * PANEL), dpi=DPI, layout="constrained", squeeze=False)


def save(fig, path):
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def imshow(ax, pixels, box):
    """Draw (C, h, w) pixels in [0, 1] stretched over a box (x0, y0, x1, y1), nearest neighbour."""
    x0, y0, x1, y1 = (float(v) for v in box)
    pixels = pixels.clamp(0, 1).numpy()
    grey = pixels.shape[0] != 3
    img = pixels[0] if grey else pixels.transpose(1, 2, 0)  # (h, w) or (h, w, 3)
    ax.imshow(img, extent=(x0, x1, y1, y0), cmap="gray" if grey else None, vmin=0, vmax=1, interpolation="nearest")


def outline(ax, box, colour, width=1.5):
    x0, y0, x1, y1 = (float(v) for v in box)
    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=width))


def frame(ax, H, W, boxes=None, title=""):
    """Image coordinates (y down) covering the image and, clipped to one image size around it, any boxes."""
    lo, hi = np.array([0.0, 0.0]), np.array([W, H], dtype=float)
    if boxes is not None:
        b = boxes.reshape(-1, 4).numpy()
        lo = np.maximum(np.minimum(lo, b[:, :2].min(axis=0)), -hi)
        hi = np.minimum(np.maximum(hi, b[:, 2:].max(axis=0)), 2 * hi)
    ax.set(xlim=(lo[0], hi[0]), ylim=(hi[1], lo[1]), aspect="equal", xticks=[], yticks=[])
    ax.set_title(title, fontsize=9)


def paste(ax, crops, boxes, ref):
    """Every patch drawn over its box on a grey canvas, the reference last and outlined."""
    ax.set_facecolor("0.5")
    for j in [j for j in range(len(boxes)) if j != ref] + [ref]:
        imshow(ax, crops[j], boxes[j])
    outline(ax, boxes[ref], REFERENCE_COLOUR)


def reconstruction(path, image, crops, boxes, placed, ref, error_px):
    """Figure 4: the image and its boxes (N, 4); the crops (N, C, P, P) at them; where reference `ref` puts them."""
    C, H, W = image.shape
    fig, axes = figure(3)
    ax = axes[0, 0]
    imshow(ax, image, (0, 0, W, H))
    for j, box in enumerate(boxes):
        outline(ax, box, REFERENCE_COLOUR if j == ref else "tab:cyan", 1.5 if j == ref else 0.5)
    frame(ax, H, W, title=f"image, {len(boxes)} patches, reference #{ref}")
    paste(axes[0, 1], crops, boxes, ref)
    frame(axes[0, 1], H, W, placed, "true placement")
    paste(axes[0, 2], crops, placed, ref)
    frame(axes[0, 2], H, W, placed, f"predicted from #{ref}: {error_px:.2f} px error")
    save(fig, path)


def uncertainty(path, image, boxes, placed, spread, targets):
    """Figure 5: each target's box and centres placed (N, N, 4) by every other patch; a heat map of the spreads."""
    C, H, W = image.shape
    centres = part.centres_sizes(placed)[0].numpy()  # (N, N, 2): [i, j] = j's centre from i
    fig, axes = figure(2)
    ax = axes[0, 0]
    imshow(ax, image, (0, 0, W, H))
    for t, colour in zip(targets, TARGET_COLOURS):
        points = np.delete(centres[:, t], t, axis=0)  # (N-1, 2)
        ax.scatter(points[:, 0], points[:, 1], s=6, color=colour, alpha=0.7, linewidths=0)
        ax.scatter(*points.mean(axis=0), s=40, color=colour, marker="x")
        outline(ax, boxes[t], colour)
    label = ", ".join(f"#{t} {spread[t]:.1f} px" for t in targets)
    frame(ax, H, W, placed[:, targets], f"from every reference\n{label}")
    ax = axes[0, 1]
    heat = ax.imshow(coverage_map(boxes, spread, H, W), extent=(0, W, H, 0), cmap="magma", interpolation="nearest")
    fig.colorbar(heat, ax=ax, shrink=0.8, label="spread of predicted centre (px)")
    frame(ax, H, W, title="per-patch uncertainty")
    save(fig, path)


def coverage_map(boxes, values, H, W):
    """Each pixel's mean of the values of the boxes covering its centre, NaN where none does -> (H, W)."""
    b = boxes.numpy()[:, :, None, None]  # (N, 4, 1, 1)
    ys, xs = np.mgrid[0:H, 0:W] + 0.5
    inside = (xs >= b[:, 0]) & (xs < b[:, 2]) & (ys >= b[:, 1]) & (ys < b[:, 3])  # (N, H, W)
    count = inside.sum(axis=0)
    total = (inside * values.numpy()[:, None, None]).sum(axis=0)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def symmetry(path, pred, target, order, shuffled):
    """Figure 6: rows dx, dy (log dw, log dh) of pred and target (N, N, k), columns predicted / true in raster order,
    then shuffled. Grey is zero, bright positive, dark negative, on one scale per row."""
    fig, axes = figure(4, pred.shape[-1])
    columns = [(kind, m, idx) for idx in (order, shuffled) for kind, m in (("predicted", pred), ("true", target))]
    for k, name in enumerate(OUTPUT_NAMES[: pred.shape[-1]]):
        log = name in ("dw", "dh")  # sizes are ratios: log puts "same size" at grey
        mats = [(m[..., k].clamp_min(1e-3).log() if log else m[..., k])[idx][:, idx] for _, m, idx in columns]
        vmax = max(float(m.abs().max()) for m in mats) or 1.0
        for c, ((kind, _, idx), m) in enumerate(zip(columns, mats)):
            ax = axes[k, c]
            im = ax.imshow(m.numpy(), cmap="gray", vmin=-vmax, vmax=vmax, interpolation="nearest")
            ax.set(xticks=[], yticks=[])
            arranged = "ordered" if idx is order else "shuffled"
            ax.set_title(f"{kind} {'log ' if log else ''}{name}, {arranged}", fontsize=9)
        fig.colorbar(im, ax=axes[k, :], shrink=0.8)
    save(fig, path)


def errors(path, error_px, zero_px):
    """Histograms of all ordered pairs' placement errors (px): the model's, and every target's put on its reference."""
    fig, axes = figure(1)
    ax = axes[0, 0]
    bins = np.linspace(0, float(max(error_px.max(), zero_px.max())), 30)
    for values, label, colour in ((zero_px, "on the reference", "tab:gray"), (error_px, "PART", "tab:blue")):
        ax.hist(values.numpy(), bins=bins, color=colour, alpha=0.6, label=f"{label}, median {values.median():.1f} px")
    ax.set_xlabel("placement error (px)", fontsize=9)
    ax.set_ylabel("pairs", fontsize=9)
    ax.legend(fontsize=7)
    ax.set_title(f"all {len(error_px)} ordered pairs", fontsize=9)
    save(fig, path)


# ---------------------------------------------------------------- one image end to end


def report_symmetry(pred, truth, scale):
    """Figure 6's numbers printed: the prediction matrices' negative symmetry and correlation with the truth."""
    mirrored, agreement = symmetry_scores(pred), correlations(pred, truth)
    print("  Figure 6, negative symmetry corr(P, -P^T): " + " ".join(f"{k} {v:.3f}" for k, v in mirrored.items())
          + "; correlation with the truth: " + " ".join(f"{k} {v:.3f}" for k, v in agreement.items()))
    if scale:
        print("  (offgrid-scale: shifts are in the reference's size, so dx, dy are scored as dx_ij = -dx_ji * dw_ij; "
              "sizes are multiplicative, dw_ij * dw_ji = 1, scored as log dw_ij = -log dw_ji)")
    return mirrored, agreement


def show_image(model, name, image, ref, target, seed, out_dir):
    """Figures 4-6 and the numbers behind them for one uint8 image (C, H, W)."""
    P, scale = model.cfg.vit.patch_size, model.scale
    torch.manual_seed(seed)  # the same boxes and shuffle for every image of one size
    patches, boxes = model.sample(image[None])  # (1, N, C, P, P), (1, N, 4)
    pred = predict_all_pairs(model, patches)[0]  # (N, N, 2|4): pred[i, j] = target j from reference i
    boxes, N = boxes[0], boxes.shape[1]  # (N, 4)
    truth = all_pair_targets(boxes, scale)  # (N, N, 2|4)
    pixels = image.float() / 255  # (C, H, W) for display
    crops = part.crop_patches(pixels[None], boxes[None], P, scale)[0]  # (N, C, P, P): what the model saw, unnormalised
    centre = part.centres_sizes(boxes)[0]  # (N, 2)
    for flag, index in (("--ref", ref), ("--target", target)):
        if index >= N:
            raise UserError(f"{flag} {index} is not a patch: the checkpoint samples {N} patches, 0..{N - 1}")
    if ref < 0:  # the patch nearest the image centre sees the others in every direction
        ref = int((centre - torch.tensor([image.shape[2], image.shape[1]]) / 2).norm(dim=1).argmin())
    placed = placed_boxes(boxes, pred)  # (N, N, 4)
    err_px = off_diagonal(placement_errors(boxes, placed))  # (N*(N-1),)
    zero_px = off_diagonal(placement_errors(boxes, boxes[:, None].expand(N, N, 4)))  # every patch on its reference
    err_ref = off_diagonal((pred[..., :2] - truth[..., :2]).norm(dim=-1))  # in the reference's size, as val_euclid
    zero_ref = off_diagonal(truth[..., :2].norm(dim=-1))
    row = slice(ref * (N - 1), (ref + 1) * (N - 1))  # the reference's own pairs in off-diagonal order
    print(f"{name}: {N} {model.cfg.sampler} patches of {P} px, all {N * N} ordered pairs predicted")
    print(  # Figure 4
        f"  Figure 4, off-grid reconstruction from reference #{ref} at ({centre[ref, 0]:.1f}, {centre[ref, 1]:.1f}): "
        f"mean placement error {err_px[row].mean():.2f} px = {err_ref[row].mean():.3f} reference sizes over {N - 1} "
        f"targets (all on the reference: {zero_px[row].mean():.2f} px = {zero_ref[row].mean():.3f}); over all "
        f"{N * (N - 1)} pairs {err_px.mean():.2f} px = {err_ref.mean():.3f} (all on the reference: "
        f"{zero_px.mean():.2f} px = {zero_ref.mean():.3f})"
    )

    # Figure 5: how much the references agree on each patch
    spread = patch_uncertainty(placed)  # (N,)
    targets = [target] if target >= 0 else [int(spread.argmin()), int(spread.argmax())]
    contrast = crops.flatten(1).std(dim=1)  # a flat patch could sit anywhere alike
    listed = ", ".join(f"#{t} {spread[t]:.2f} px" for t in targets)
    print(
        f"  Figure 5, patch uncertainty (RMS spread of a patch's {N - 1} predicted centres): median "
        f"{spread.median():.2f} px, {listed}; correlation with the patch's pixel std {pearson(spread, contrast):+.2f}"
    )

    mirrored, agreement = report_symmetry(pred, truth, scale)  # Figure 6: the N x N prediction matrices
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}_{kind}.png" for kind in ("reconstruction", "uncertainty", "symmetry", "errors")]
    reconstruction(paths[0], pixels, crops, boxes, placed[ref], ref, err_px[row].mean().item())
    uncertainty(paths[1], pixels, boxes, placed, spread, targets)
    order = raster_order(boxes, P)
    symmetry(paths[2], pred, truth, order, torch.randperm(N))
    errors(paths[3], err_px, zero_px)
    numbers = dict(image=name, sampler=model.cfg.sampler, patch_size=P, reference=ref, targets=targets,
                   boxes=boxes.tolist(), pred=pred.tolist(), truth=truth.tolist(), uncertainty_px=spread.tolist(),
                   placement_error_px=err_px[row].mean().item(), placement_error_ref=err_ref[row].mean().item(),
                   symmetry=mirrored, correlation_with_truth=agreement, raster_order=order.tolist())
    (out_dir / f"{name}_numbers.json").write_text(json.dumps(numbers))
    print("  wrote " + ", ".join(str(p) for p in paths) + f" and {name}_numbers.json")


# ---------------------------------------------------------------- training curves


def read_log(out_dir):
    """A run's log.jsonl rows in order (engine.fit writes them); ValueError naming the path when there are none."""
    path = Path(out_dir) / "log.jsonl"
    if not path.is_file():
        raise ValueError(f"{path} not found: not the folder of a training run")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path} has no rows yet")
    return rows


def plot_runs(out_dirs, path):
    """The runs' loss, lr and held-out metrics (the val_* keys of epoch rows) against the step, one panel each,
    one line per run labelled by its folder's name, into one PNG at path."""
    runs = [(Path(d).name, read_log(d)) for d in out_dirs]
    logged = {k for _, rows in runs for row in rows for k in row}
    held_out = sorted(k for k in logged if k.startswith("val_"))
    keys = [k for k in ("loss", "lr") if k in logged] + held_out  # no step rows in a run shorter than --log-every
    if not keys:
        raise ValueError(f"the log.jsonl of {', '.join(map(str, out_dirs))} has no loss, lr or val_* values")
    cols = min(len(keys), 3)  # panels a row
    fig, axes = figure(cols, math.ceil(len(keys) / cols))
    for ax, key in zip(axes.flat, keys):
        for i, (name, rows) in enumerate(runs):
            points = [(row["step"], row[key]) for row in rows if key in row]  # none where the run lacks the key
            if points:  # a run keeps its colour in every panel; epochs are few, so their points are marked
                ax.plot(*zip(*points), color=f"C{i}", label=name, marker="." if key in held_out else None)
        ax.set(title=key, xlabel="step")
        ax.legend(fontsize="small")
    for ax in axes.flat[len(keys) :]:
        ax.axis("off")
    save(fig, path)
