"""The tables of compare.sh, from the runs' log.jsonl files: mean ± sample std over seeds; and,
once the sleep study has run, its sample-efficiency curve as OUT/sleep_sample_efficiency.png.

    python compare_table.py out/compare 0 1 2
"""

import json
import re
import statistics
import sys
from pathlib import Path

import torch


def rows(path):
    log = Path(path) / "log.jsonl"
    return [json.loads(line) for line in open(log)] if log.exists() else []


def finished(path):
    """Whether the run in `path` has trained all the epochs its checkpoint's recipe asks for."""
    ckpt = Path(path) / "checkpoint.pt"
    if not ckpt.exists():
        return False
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    return state["epoch"] >= state["config"]["recipe"]["epochs"]


def last(path, key):
    """The last value of key in a finished run's log.jsonl, or None (also while the run is going on)."""
    values = [r[key] for r in rows(path) if key in r]
    return values[-1] if values and finished(path) else None


def minutes(path):
    return sum(r["epoch_s"] for r in rows(path) if "epoch_s" in r) / 60 or None


def knn(path):
    text = Path(path).read_text() if Path(path).exists() else ""
    match = re.search(r"kNN top-1 ([0-9.]+)", text)
    return float(match.group(1)) if match else None


def ratio(path):
    euclid, zero = last(path, "val_euclid"), last(path, "val_euclid_zero")
    return euclid / zero if euclid is not None and zero else None


def cell(values, digits=3):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f} (1 seed)"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(header, names, columns):
    """columns: (title, function of a row name -> per-seed values, digits)."""
    print(f"\n{header}\n| row | " + " | ".join(t for t, _, _ in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name in names:
        print(f"| {name} | " + " | ".join(cell(f(name), d) for _, f, d in columns) + " |")


def main(out, seeds):
    run = lambda *parts: [out / f"seed{s}" / "/".join(parts).format(s=s) for s in seeds]  # noqa: E731
    print(f"seeds {' '.join(seeds)}; mean ± sample std over seeds")
    table(
        "Methods: Fashion-MNIST and nuclei (compare.sh methods)",
        ["scratch", "part", "mae", "droppos"],
        [
            ("pretraining min", lambda m: [minutes(p) for p in run(f"pre_{m}")], 1),
            ("finetune top-1", lambda m: [last(p, "val_acc") for p in run(f"ft_{m}")], 3),
            ("linear probe top-1", lambda m: [last(p, "val_acc") for p in run(f"probe_{m}")], 3),
            ("kNN top-1", lambda m: [knn(p) for p in run(f"knn_{m}.txt")], 3),
            ("AP box", lambda m: [last(p, "val_AP_box") for p in run(f"det_{m}")], 1),
            ("AP mask", lambda m: [last(p, "val_AP_mask") for p in run(f"det_{m}")], 1),
            ("sleep kappa (n=10)", lambda m: [last(p, "val_kappa") for p in run(f"../sleep/seed{{s}}/ft_{m}_n10")], 3),
        ],
    )
    sleep = ["scratch", "part", "part-posmask", "part-posmask-context2", "mae", "droppos"]
    table(
        "Sleep staging, synthetic (compare.sh sleep)",
        sleep,
        [
            ("pretraining min", lambda m: [minutes(p) for p in run(f"../sleep/seed{{s}}/pre_{m}")], 1),
            ("held-out Δt error / zero predictor", lambda m: [ratio(p) for p in run(f"../sleep/seed{{s}}/pre_{m}")], 4),
            (
                "pretext metric (DropPos: position acc)",
                lambda m: [last(p, "val_pos_acc") or last(p, "val_loss") for p in run(f"../sleep/seed{{s}}/pre_{m}")],
                3,
            ),
            *[
                (
                    f"kappa n={n}",
                    lambda m, n=n: [last(p, "val_kappa") for p in run(f"../sleep/seed{{s}}/ft_{m}_n{n}")],
                    3,
                )
                for n in (2, 5, 10, 20)
            ],
        ],
    )
    table(
        "PART ablations (compare.sh ablations; offgrid is `methods`' part row)",
        ["default", "offgrid", "residual", "grid", "pairwise-mlp", "mlp"],
        [
            ("pretraining min", lambda m: [minutes(p) for p in run(f"pre_{'part' if m == 'offgrid' else m}")], 1),
            ("val euclid / zero", lambda m: [ratio(p) for p in run(f"pre_{'part' if m == 'offgrid' else m}")], 3),
            ("kNN top-1", lambda m: [knn(p) for p in run(f"knn_{'part' if m == 'offgrid' else m}.txt")], 3),
            ("finetune top-1", lambda m: [last(p, "val_acc") for p in run(f"ft_{'part' if m == 'offgrid' else m}")], 3),
        ],
    )


CURVE = {
    "scratch": "scratch",
    "part": "PART, no positions (today's reading)",
    "part-posmask": "PART, --pos-mask 0.2 (the other)",
}


def plot_sample_efficiency(out, seeds, path):
    """8.2's curve: kappa on the held-out subjects against the number of finetuning subjects, mean ± std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, label in CURVE.items():
        points = []
        for n in (2, 5, 10, 20):
            values = [
                v
                for v in (last(out / "sleep" / f"seed{s}" / f"ft_{name}_n{n}", "val_kappa") for s in seeds)
                if v is not None
            ]
            if values:
                points.append((n, statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0))
        if points:
            n, mean, std = zip(*points)
            ax.errorbar(n, mean, yerr=std, marker="o", capsize=3, label=label)
    ax.set(
        xscale="log", xlabel="finetuning subjects (about 360 steps each)", ylabel="Cohen's kappa, 10 held-out subjects",
        title=f"Sleep staging, SYNTHETIC EEG, {len(seeds)} seeds", fontsize=10,
    )
    ax.minorticks_off()
    ax.set_xticks([2, 5, 10, 20], ["2", "5", "10", "20"])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    out, seeds = Path(sys.argv[1]), sys.argv[2:]
    main(out, seeds)
    if (out / "sleep").is_dir():
        plot_sample_efficiency(out, seeds, out / "sleep_sample_efficiency.png")
