"""The figures of what PART learned (paper section 5.1), drawn with matplotlib:

    reconstruction   Figure 4: the patches at their true places and where one reference puts them
    uncertainty      Figure 5: one target placed from every reference, and every patch's spread
    symmetry         Figure 6: the N x N matrices of predicted dx, dy (dw, dh) beside the truth
    errors           the placement errors of every pair, beside those of putting each patch on its reference

    python train.py show --ckpt out/pretrain/checkpoint.pt [--image photo.jpg]

The numbers come from part.py's last section; this file only draws them. Images are
(C, H, W) floats in [0, 1], boxes pixels as x0, y0, x1, y1. Every panel is PANEL x PANEL
inches at DPI, so a figure of c x r panels is exactly (c * PANEL * DPI, r * PANEL * DPI) pixels;
small images are upscaled by nearest neighbour.
"""
import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

PANEL, DPI = 3.0, 100  # 300 x 300 pixels per panel
REFERENCE_COLOUR = "red"
TARGET_COLOURS = ("tab:orange", "gold", "tab:cyan", "tab:pink")  # the paper's Figure 5: orange, then yellow


def figure(cols, rows=1):
    fig, axes = plt.subplots(rows, cols, figsize=(cols * PANEL, rows * PANEL), dpi=DPI, layout="constrained", squeeze=False)
    return fig, axes


def save(fig, path):
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def imshow(ax, pixels, box, **kwargs):
    """Draw (C, h, w) pixels in [0, 1] stretched over a box (x0, y0, x1, y1), nearest neighbour."""
    x0, y0, x1, y1 = (float(v) for v in box)
    pixels = pixels.clamp(0, 1).numpy()
    grey = pixels.shape[0] != 3
    img = pixels[0] if grey else pixels.transpose(1, 2, 0)  # (h, w) or (h, w, 3)
    ax.imshow(img, extent=(x0, x1, y1, y0), cmap="gray" if grey else None, vmin=0, vmax=1, interpolation="nearest", **kwargs)


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
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(hi[1], lo[1])
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)


def paste(ax, crops, boxes, ref):
    """Every patch drawn over its box on a grey canvas, the reference last and outlined."""
    ax.set_facecolor("0.5")
    for j in [j for j in range(len(boxes)) if j != ref] + [ref]:
        imshow(ax, crops[j], boxes[j])
    outline(ax, boxes[ref], REFERENCE_COLOUR)


def reconstruction(path, image, crops, boxes, placed, ref, error_px):
    """Figure 4: the image with its sampled boxes; the patches at their true boxes; the patches
    where reference `ref` puts them. crops (N, C, P, P), boxes and placed (N, 4)."""
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
    """Figure 5: each target's true box and its centres as predicted from every other patch;
    a heat map of every patch's spread (pixels), averaged where boxes overlap. placed (N, N, 4)."""
    C, H, W = image.shape
    centres = ((placed[..., :2] + placed[..., 2:]) / 2).numpy()  # (N, N, 2): [i, j] = j's centre from i
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


def symmetry(path, pred, target, order, shuffled, names):
    """Figure 6: rows dx, dy (log dw, log dh), columns predicted / true in raster order, then
    in a shuffled order. pred and target (N, N, k); entry (i, j): target j from reference i.
    Grey is zero, bright positive, dark negative, on one scale per row."""
    rows = pred.shape[-1]
    fig, axes = figure(4, rows)
    columns = (("predicted", pred, order), ("true", target, order), ("predicted", pred, shuffled), ("true", target, shuffled))
    for k, name in enumerate(names):
        log = name in ("dw", "dh")  # sizes are ratios: log puts "same size" at grey
        mats = [(m[..., k].clamp_min(1e-3).log() if log else m[..., k])[idx][:, idx] for _, m, idx in columns]
        vmax = max(float(m.abs().max()) for m in mats) or 1.0
        for c, ((kind, _, idx), m) in enumerate(zip(columns, mats)):
            ax = axes[k, c]
            im = ax.imshow(m.numpy(), cmap="gray", vmin=-vmax, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{kind} {'log ' if log else ''}{name}, {'ordered' if idx is order else 'shuffled'}", fontsize=9)
        fig.colorbar(im, ax=axes[k, :], shrink=0.8)
    save(fig, path)


def errors(path, error_px, zero_px):
    """Histograms of the placement errors of all ordered pairs (pixels, centre to centre): the
    model's and the trivial answer's (every target on its reference), with their medians."""
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
