"""The tables of compare.sh, from the runs' log.jsonl files: mean ± sample std over seeds, every row
against the table's reference row (PART's) as a gap or a tie; the search's table, every point with the
chosen one marked; and, once the sleep study has run, its sample-efficiency curve as
OUT/sleep_sample_efficiency.png.

    python studies/compare_table.py out/compare 0 1 2  # the tables of the runs finished so far
    python studies/compare_table.py --best 5e-4=DIR 1.5e-3=DIR ...  # compare.sh search: the best-finetuning value
    python studies/compare_table.py --best 128=DIR,DIR,DIR 512=DIR,DIR,DIR ...  # the best mean over seeds
    python studies/compare_table.py --beyond 5e-4=DIR 1.5e-3=DIR ...  # the next blr to try when an end of the grid wins
    python studies/compare_table.py --readme out/compare/readme  # compare.sh readme: README's numbers beside a rerun

Runs that have not trained all the epochs their recipe asks for are left out of every cell (`finished`).

The tie rule: a row's mean ties the reference row's when |difference| <= the larger of the two sample
stds, that is when either row's own seed-to-seed spread covers the gap (the issue: "a gap inside the
spread is a tie"). The larger std rather than a t-test: at 3 seeds a test has little power and its p-value
would look more exact than it is, while this rule can be checked by eye against the printed ± values.
A cell of one seed gets no verdict: there is no spread to judge by.
"""

import json
import math
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
    return (sum(r["epoch_s"] for r in rows(path) if "epoch_s" in r) / 60 or None) if finished(path) else None


def knn(path):
    """kNN top-1 from the output of train.py knn that compare.sh keeps in the folder `path`."""
    text = (Path(path) / "knn.txt").read_text() if (Path(path) / "knn.txt").exists() else ""
    match = re.search(r"kNN top-1 ([0-9.]+)", text)
    return float(match.group(1)) if match else None


def ratio(path):
    euclid, zero = last(path, "val_euclid"), last(path, "val_euclid_zero")
    return euclid / zero if euclid is not None and zero else None


def step_ratios(path):
    """{method: its pretraining step time / PART's} from the output of `train.py bench --methods`."""
    text = Path(path).read_text() if Path(path).exists() else ""
    return {m: float(r) for m, r in re.findall(r"^(\w+)\s+step .*?([0-9.]+) x PART's", text, re.MULTILINE)}


def verdict(values, reference, digits):
    """'tie' when the means differ by no more than the larger sample std, else the signed gap
    (values - reference); None with fewer than 2 values on either side."""
    if len(values) < 2 or len(reference) < 2:
        return None
    gap = statistics.mean(values) - statistics.mean(reference)
    return "tie" if abs(gap) <= max(statistics.stdev(values), statistics.stdev(reference)) else f"{gap:+.{digits}f}"


def cell(values, digits=3, reference=None):
    """mean ± sample std of the values that are not None; given the reference row's values, the gap
    to them or 'tie' in brackets. A string is a cell already (a measurement that has no seeds)."""
    if isinstance(values, str):
        return values
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f} (1 seed)"
    text = f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"
    against = verdict(values, [v for v in reference if v is not None], digits) if reference is not None else None
    return f"{text} ({against})" if against else text


def table(header, names, columns, reference=None):
    """Markdown lines; columns: (title, function of a row name -> per-seed values or a string, digits).
    Every row but `reference` is compared with it, cell by cell (the tie rule)."""
    vs = f"; in brackets the gap to {reference}'s mean, or a tie (the gap within the larger std)" if reference else ""
    lines = [
        f"\n{header}{vs}",
        "| row | " + " | ".join(t for t, _, _ in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for name in names:
        cells = []
        for _, f, digits in columns:
            ref = f(reference) if reference and name != reference else None
            cells.append(cell(f(name), digits, None if isinstance(ref, str) else ref))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


# ---------------------------------------------------------------- the search (compare.sh search)


POINT = re.compile(  # compare.sh's point()
    r"ft_(?P<method>[a-z0-9]+)_blr(?P<blr>[^_]+)(?:_pairs(?P<pairs>\d+))?(?:_seed(?P<seed>\d+))?$"
)


def accuracies(folders):
    """The last val_acc of each finished finetuning among the folders; NaN left out (it would win or lose by
    position)."""
    return [acc for acc in (last(path, "val_acc") for path in folders) if acc is not None and math.isfinite(acc)]


def best(candidates):
    """candidates: [(value, [finetuning folders, one per seed])] -> the value whose finished finetunings have the
    highest mean val_acc, or None when none finished; on an exact tie the first wins (compare.sh lists today's
    default first)."""
    scored = [(statistics.mean(accs), value) for value, folders in candidates if (accs := accuracies(folders))]
    return max(scored, key=lambda s: s[0])[1] if scored else None


def beyond(candidates, factor=3):
    """candidates: [(value, [finetuning folders])] -> when the best value is the grid's largest (smallest), the value
    `factor` times above (below) it, to be tried next so that the choice is bracketed; None when an inner value
    wins or none finished. Written as compare.sh names its points (1.35e-2)."""
    winner = best(candidates)
    values = sorted(float(value) for value, _ in candidates)
    if winner is None or values[0] < float(winner) < values[-1]:
        return None
    step = factor if float(winner) == values[-1] else 1 / factor
    mantissa, exponent = f"{float(winner) * step:.3e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def candidates(args):
    """compare.sh's VALUE=FOLDER[,FOLDER...] arguments -> [(value, [folders])]."""
    return [(value, [f for f in folders.split(",") if f]) for value, folders in (arg.split("=", 1) for arg in args)]


def chosen(search):
    """The search's choices, {(method, "blr" or "pairs"): value}, from the chosen.txt compare.sh writes."""
    path = Path(search) / "chosen.txt"
    lines = path.read_text().splitlines() if path.exists() else []
    return {(m, key): value for m, key, value in (line.split() for line in lines if line.strip())}


def is_chosen(picks, method, blr, pairs):
    """Whether the point (method, blr, pairs) is the one chosen.txt names (pairs: PART's alone, else None)."""
    return (
        (method, "blr") in picks
        and float(picks[method, "blr"]) == blr
        and (pairs is None or picks.get((method, "pairs")) == str(pairs))
    )


BLR_INIT = 1e-9  # compare.sh's control: the encoder as initialised


def search_table(search):
    """Markdown lines: every point of the search (finetuning folders named by compare.sh's point()) with its
    finetune top-1 on the held-out training images, mean ± sample std where more seeds ran (PART's pairs); the
    point the methods runs use is marked; the controls (scratch, each method's init) first."""
    points = {}  # (method, pairs, blr, blr as written) -> the point's folders, one per seed
    for path in Path(search).glob("ft_*"):
        if m := POINT.match(path.name):
            points.setdefault((m["method"], int(m["pairs"] or 0), float(m["blr"]), m["blr"]), []).append(path)
    if not points:
        return []
    picks = chosen(search)
    lines = [
        "\nSearch (compare.sh search): finetune top-1 on the training images held out by --val-from-train; "
        "blr per method (PART at today's pairs, one seed), then PART's pairs at its chosen blr (every seed)",
        "| method | blr | pairs | finetune top-1 (held-out training images) | chosen |",
        "|---|---|---|---|---|",
    ]
    scratch = accuracies([Path(search) / "ft_scratch"])
    lines += [f"| scratch (no pretraining) | - | - | {cell(scratch, 4)} | |"] if scratch else []
    for (method, pairs, blr, text), folders in sorted(points.items()):
        accs = accuracies(folders)
        mark = "◀ chosen" if is_chosen(picks, method, blr, pairs or None) else ""
        text += " (init only)" if blr == BLR_INIT else ""
        lines.append(f"| {method} | {text} | {pairs or '-'} | {cell(accs, 4) if accs else 'unfinished'} | {mark} |")
    if not picks:
        lines.append("no choice yet: compare.sh search writes chosen.txt when it ends")
    return lines


# ---------------------------------------------------------------- the tables


METHODS = ["scratch", "part", "mp3", "mae", "droppos"]
SLEEP = ["scratch", "part", "part-posmask", "part-posmask-context2", "mp3", "mae", "droppos"]


DETECTION = [("AP^b", "val_AP_box"), ("AP^b_50", "val_AP50_box"), ("AP^b_75", "val_AP75_box"), ("AP^m", "val_AP_mask")]


def per_seed(root, seeds):
    """A function of a run's name -> its folder under root/seedS, one per seed (compare.sh's layout)."""
    return lambda name: [root / f"seed{s}" / name for s in seeds]


def main(out, seeds):
    run, sleep = per_seed(out, seeds), per_seed(out / "sleep", seeds)
    lines = [f"seeds {' '.join(seeds)}; mean ± sample std over seeds", *search_table(out / "search")]
    lines += methods_tables(run, sleep, step_ratios(out / "bench" / "methods.txt"))
    lines += sleep_table(sleep)
    lines += ablations_table(run)
    print("\n".join(lines))


def methods_tables(run, sleep, cost):
    """Markdown lines: the methods table (compare.sh methods), then the rows beside it: PART's scale extension
    (Table 1; compare.sh scale) and every row on one init (compare.sh init)."""
    finetune = ("finetune top-1", lambda m: [last(p, "val_acc") for p in run(f"ft_{m}")], 3)
    detection = [(title, lambda m, key=key: [last(p, key) for p in run(f"det_{m}")], 1) for title, key in DETECTION]
    lines = table(
        "Methods: Fashion-MNIST and nuclei (compare.sh methods)",
        METHODS,
        [
            ("pretraining step / PART's (bench --methods)", lambda m: f"{cost[m]:.2f}" if m in cost else "-", 2),
            finetune,
            ("linear probe top-1", lambda m: [last(p, "val_acc") for p in run(f"probe_{m}")], 3),
            ("kNN top-1", lambda m: [knn(p) for p in run(f"knn_{m}")], 3),
            *detection,
            ("sleep kappa (n=10)", lambda m: [last(p, "val_kappa") for p in sleep(f"ft_{m}_n10")], 3),
        ],
        reference="part",
    )
    lines += table(
        "Table 1, PART and its scale extension (compare.sh scale: --sampler offgrid-scale, also dw and dh)",
        ["part", "part-scale"],
        [finetune, *detection],
        reference="part",
    )
    return lines + table(
        "One init for every row (compare.sh init): scratch, PART and MP3 after --xavier-init, MAE's and DropPos' own",
        ["scratch-xavier", "part-xavier", "mp3-xavier", "mae", "droppos"],
        [finetune, *detection],
        reference="part-xavier",
    )


def sleep_table(sleep):
    """Markdown lines: the 1D study (compare.sh sleep), its sample-efficiency columns included."""
    return table(
        "Sleep staging, synthetic (compare.sh sleep)",
        SLEEP,
        [
            ("pretraining min", lambda m: [minutes(p) for p in sleep(f"pre_{m}")], 1),
            ("held-out Δt error / zero predictor", lambda m: [ratio(p) for p in sleep(f"pre_{m}")], 4),
            (  # one metric per method, so no row is set against PART's: the cell comes as a string
                "pretext metric (DropPos, MP3: position acc)",
                lambda m: cell([last(p, "val_pos_acc") or last(p, "val_loss") for p in sleep(f"pre_{m}")]),
                3,
            ),
            *[
                (f"kappa n={n}", lambda m, n=n: [last(p, "val_kappa") for p in sleep(f"ft_{m}_n{n}")], 3)
                for n in (2, 5, 10, 20)
            ],
        ],
        reference="part",
    )


def ablations_table(run):
    """Markdown lines: PART's own rows (compare.sh ablations)."""
    name = lambda m: "part" if m == "offgrid" else m  # noqa: E731  the offgrid row is `methods`' part row
    return table(
        "PART ablations (compare.sh ablations; offgrid is `methods`' part row)",
        ["default", "offgrid", "grid", "pairwise-mlp", "mlp"],
        [
            ("pretraining min", lambda m: [minutes(p) for p in run(f"pre_{name(m)}")], 1),
            ("val euclid / zero", lambda m: [ratio(p) for p in run(f"pre_{name(m)}")], 3),
            ("kNN top-1", lambda m: [knn(p) for p in run(f"knn_{name(m)}")], 3),
            ("finetune top-1", lambda m: [last(p, "val_acc") for p in run(f"ft_{name(m)}")], 3),
        ],
        reference="offgrid",
    )

CURVE = {
    "scratch": "scratch",
    "part": "PART, no positions (today's reading)",
    "part-posmask": "PART, --pos-mask 0.2 (the other)",
    "mp3": "MP3",
    "mae": "MAE",
    "droppos": "DropPos",
}


def plot_sample_efficiency(out, seeds, path):
    """8.2's curve: kappa on the held-out subjects against the number of finetuning subjects, mean ± std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    sleep = per_seed(out / "sleep", seeds)
    for name, label in CURVE.items():
        points = []
        for n in (2, 5, 10, 20):
            values = [v for v in (last(p, "val_kappa") for p in sleep(f"ft_{name}_n{n}")) if v is not None]
            if values:
                points.append((n, statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0))
        if points:
            n, mean, std = zip(*points)
            ax.errorbar(n, mean, yerr=std, marker="o", capsize=3, label=label)
    ax.set(
        xscale="log", xlabel="finetuning subjects (about 360 steps each)", ylabel="Cohen's kappa, 10 held-out subjects",
    )
    ax.set_title(f"Sleep staging, SYNTHETIC EEG, {len(seeds)} seeds", fontsize=10)
    ax.minorticks_off()
    ax.set_xticks([2, 5, 10, 20], ["2", "5", "10", "20"])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


# ---------------------------------------------------------------- README's numbers (compare.sh readme)


def printed(name, pattern):
    """The number a command printed, kept by compare.sh in the file `name` of the folder: a function of the
    folder -> the first group of `pattern`, or None."""

    def read(folder):
        path = Path(folder) / name
        match = re.search(pattern, path.read_text()) if path.exists() else None
        return float(match.group(1)) if match else None

    return read


README_FIGURES = {  # each row of README.md's "Reference numbers" -> its value in a `compare.sh readme` folder
    "default run: held-out error / zero predictor": lambda d: ratio(d / "pretrain"),
    "default run: minutes": lambda d: minutes(d / "pretrain"),
    "show: placement error from the reference (px)": printed("show/show.txt", r"mean placement error ([0-9.]+) px"),
    "show: corr(P, -P^T), dx": printed("show/show.txt", r"corr\(P, -P\^T\): dx ([-0-9.]+)"),
    "show: corr(P, -P^T), dy": printed("show/show.txt", r"corr\(P, -P\^T\): dx [-0-9.]+ dy ([-0-9.]+)"),
    "show: least certain patch": printed("show/show.txt", r"#\d+ [0-9.]+ px, #(\d+) [0-9.]+ px"),
    "show: spread vs pixel std, correlation": printed("show/show.txt", r"pixel std ([-+0-9.]+)"),
    "bench: PART step (ms)": printed("bench/bench.txt", r"PART step\s+([0-9.]+) ms"),
    "bench: PART step / bare ViT step": printed("bench/bench.txt", r"ratio ([0-9.]+)"),
    "kNN top-1": lambda d: knn(d / "knn"),
    "finetune top-1": lambda d: last(d / "finetune", "val_acc"),
    "linear probe top-1": lambda d: last(d / "probe", "val_acc"),
    "detection AP^b": lambda d: last(d / "detect", "val_AP_box"),
    "detection AP^m": lambda d: last(d / "detect", "val_AP_mask"),
}


def quoted(readme):
    """{figure: its value as README's "Reference numbers" table writes it} for the figures of README_FIGURES."""
    cells = [line.split("|")[1:3] for line in Path(readme).read_text().splitlines() if line.startswith("| ")]
    return {figure.strip(): value.strip() for figure, value in cells if figure.strip() in README_FIGURES}


def as_quoted(value, quote):
    """value written as `quote` is: as many decimals, a sign where it has one ("#12" for a patch)."""
    if value is None:
        return "-"
    if quote.startswith("#"):
        return f"#{value:.0f}"
    decimals = len(quote.split(".")[1]) if "." in quote else 0
    return f"{value:{'+' if quote[:1] in '+-' else ''}.{decimals}f}"


def readme_table(folder, readme):
    """Markdown lines: every figure README quotes, its value there and in the rerun, and whether they agree."""
    written = quoted(readme)
    lines = [
        f"README's numbers ({readme}) beside the rerun in {folder}",
        "| figure | README | rerun | |",
        "|---|---|---|---|",
    ]
    for figure, read in README_FIGURES.items():
        quote = written.get(figure, "not quoted")
        now = as_quoted(read(Path(folder)), quote)
        verdict = "" if now == "-" else "same" if now == quote else "differs"
        lines.append(f"| {figure} | {quote} | {now} | {verdict} |")
    return lines


if __name__ == "__main__":
    if sys.argv[1:2] == ["--best"]:
        print(best(candidates(sys.argv[2:])) or "")
    elif sys.argv[1:2] == ["--beyond"]:
        print(beyond(candidates(sys.argv[2:])) or "")
    elif sys.argv[1:2] == ["--readme"]:
        print("\n".join(readme_table(sys.argv[2], Path(__file__).with_name("README.md"))))
    else:
        out, seeds = Path(sys.argv[1]), sys.argv[2:]
        main(out, seeds)
        if (out / "sleep").is_dir():
            plot_sample_efficiency(out, seeds, out / "sleep_sample_efficiency.png")
