"""The tooling of the tuned comparison (compare.sh, issue 22): the validation split carved from the
training images (train.py --val-from-train) and compare_table.py's cells, tie rule and search table."""

import json
import math

import pytest
import torch

import compare_table
import data
import engine
import train
from conftest import TINY_RUN, fmnist_flags, invoke


def images_of(dataset):
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def test_val_from_train_holds_out_training_images_the_same_under_every_seed(fake_fmnist):
    flags = fmnist_flags(fake_fmnist, 24)
    _, train_set, val_set = train.load_sets(flags, data.eval_transform, data.eval_transform, seed=0)
    assert (len(train_set), len(val_set)) == (96 - 24, 24)
    everything = images_of(
        data.build_dataset("fashion-mnist", fake_fmnist, "train", data.DATASETS["fashion-mnist"], None)
    )
    test_images = images_of(
        data.build_dataset("fashion-mnist", fake_fmnist, "val", data.DATASETS["fashion-mnist"], None)
    )

    def indices(dataset):  # which training images, found by content (the fake images are all distinct)
        return {next(j for j in range(len(everything)) if torch.equal(everything[j], x)) for x in images_of(dataset)}

    held_out, rest = indices(val_set), indices(train_set)
    assert not held_out & rest and len(held_out | rest) == 96
    assert not any(torch.equal(x, t) for x in images_of(val_set) for t in test_images)  # never the test images
    for seed in (1, 7):  # --seed draws the subset, never the split
        _, subset, other_val = train.load_sets(
            fmnist_flags(fake_fmnist, 24, train_subset=40), data.eval_transform, data.eval_transform, seed
        )
        assert indices(other_val) == held_out
        assert len(subset) == 40 and indices(subset) <= rest
    blank = lambda info, name: torch.zeros_like  # noqa: E731  a training transform the held-out images must not get
    _, train_set, val_set = train.load_sets(fmnist_flags(fake_fmnist, 24), blank, data.eval_transform)
    assert images_of(train_set).eq(0).all() and indices(val_set) == held_out


def test_val_from_train_is_recorded_and_a_resume_on_another_split_stops(fake_fmnist, tmp_path):
    common = ["pretrain", "--data-dir", fake_fmnist, *TINY_RUN, "--epochs", 1, "--out-dir", tmp_path]
    assert invoke(*common, "--val-from-train", 32).exit_code == 0
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["config"]["val_from_train"] == 32
    result = invoke(*common, "--val-from-train", 16)
    assert result.exit_code == 1 and "another model or data (val_from_train: 32 -> 16)" in result.output, result.output
    with pytest.raises(engine.UserError, match="leaves none of the 96 training images"):
        train.load_sets(fmnist_flags(fake_fmnist, 96), data.eval_transform, data.eval_transform)


# ---------------------------------------------------------------- compare_table.py on fake run folders


def fake_run(path, epochs_done=2, epochs=2, **last_values):
    """A run folder as engine.fit leaves it: log.jsonl (a step row, then an epoch row with the values) and a
    checkpoint holding the epoch reached and the recipe's epochs."""
    path.mkdir(parents=True)
    rows = [{"epoch": 1, "step": 10, "loss": 1.0}, {"epoch": epochs_done, "step": 20, "epoch_s": 60.0, **last_values}]
    (path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    torch.save({"epoch": epochs_done, "config": {"recipe": {"epochs": epochs}}}, path / "checkpoint.pt")


def mean_std(values):
    """Mean and sample std (n - 1), written out."""
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def row_cells(text, header, name):
    """The cells of row `name` in the markdown table under the line that starts with `header`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    titles = [t.strip() for t in lines[start + 1].strip("|").split("|")]
    row = next(line for line in lines[start + 3 :] if line.startswith(f"| {name} |"))
    return dict(zip(titles, (c.strip() for c in row.strip("|").split("|"))))


BENCH_OUTPUT = """ViT 128 wide x 4, patch 4, at 28x28px, batch 256, cross-attention, offgrid, on CPU, 2 threads; PART: ...
N   49, K   128: PART step    438.1 ms =    73.0 img/s, bare ViT    105.2 ms, ratio 4.162; sampler 2.1%
part     step    315.8 ms =   101.3 img/s, 1.00 x PART's; GFLOP/img (fwd+bwd) 0.245
mae      step    240.3 ms =   106.5 img/s, 0.76 x PART's; GFLOP/img (fwd+bwd) 0.174
mp3      step    125.2 ms =   255.6 img/s, 0.40 x PART's; GFLOP/img (fwd+bwd) 0.204
"""


def test_methods_table_mean_sample_std_ties_and_unfinished_runs(tmp_path, capsys):
    acc = {
        "part": [0.600, 0.620, 0.610],  # std 0.010
        "mae": [0.700, 0.720, 0.990],  # the third seed unfinished: left out
        "mp3": [0.580, 0.650, 0.620],  # gap +0.007, inside the spread: a tie
        "droppos": [0.630, 0.632, 0.634],
    }  # std 0.002, gap +0.022 beyond PART's 0.010: not a tie
    for method, values in acc.items():
        for seed, value in enumerate(values):
            fake_run(
                tmp_path / f"seed{seed}" / f"ft_{method}",
                epochs_done=1 if (method, seed) == ("mae", 2) else 2,
                val_acc=value,
            )
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "methods.txt").write_text(BENCH_OUTPUT)
    compare_table.main(tmp_path, ["0", "1", "2"])
    text = capsys.readouterr().out
    cell = {m: row_cells(text, "Methods", m)["finetune top-1"] for m in acc}
    finished = {m: v[:2] if m == "mae" else v for m, v in acc.items()}
    (part_mean, part_std), gap = mean_std(finished["part"]), {}
    for method in ("mae", "mp3", "droppos"):
        mean, std = mean_std(finished[method])
        assert cell[method].startswith(f"{mean:.3f} ± {std:.3f} (")
        gap[method] = "tie" if abs(mean - part_mean) <= max(std, part_std) else f"{mean - part_mean:+.3f}"
    assert cell["part"] == "{:.3f} ± {:.3f}".format(*mean_std(acc["part"]))  # the reference row: no verdict
    assert gap == {"mae": "+0.100", "mp3": "tie", "droppos": "+0.022"}
    assert all(cell[m].endswith(f"({gap[m]})") for m in gap)
    assert row_cells(text, "Methods", "scratch")["finetune top-1"] == "-"
    cost = {
        m: row_cells(text, "Methods", m)["pretraining step / PART's (bench --methods)"]
        for m in ("scratch", "part", "mae", "mp3", "droppos")
    }
    assert cost == {"scratch": "-", "part": "1.00", "mae": "0.76", "mp3": "0.40", "droppos": "-"}


def test_one_init_table_compares_every_row_with_part_on_xavier(tmp_path, capsys):
    acc = {"part-xavier": [0.66, 0.68], "scratch-xavier": [0.62, 0.63], "mae": [0.70, 0.72], "mp3-xavier": [0.67]}
    for row, values in acc.items():
        for seed, value in enumerate(values):
            fake_run(tmp_path / f"seed{seed}" / f"ft_{row}", val_acc=value)
    for seed, (part_ap, mae_ap) in enumerate([(30.0, 10.0), (34.0, 12.0)]):
        fake_run(tmp_path / f"seed{seed}" / "det_part-xavier", val_AP_box=part_ap)
        fake_run(tmp_path / f"seed{seed}" / "det_mae", val_AP_box=mae_ap)
    compare_table.main(tmp_path, ["0", "1"])
    text = capsys.readouterr().out
    assert row_cells(text, "One init", "mae")["AP^b"].endswith("(-21.0)")  # 11.0 - 32.0, beyond the larger std 2.8
    cells = {row: row_cells(text, "One init", row)["finetune top-1"] for row in [*acc, "droppos"]}
    assert cells["part-xavier"] == "0.670 ± {:.3f}".format(mean_std(acc["part-xavier"])[1])  # the reference
    assert cells["scratch-xavier"].endswith("(-0.045)")  # 0.625 - 0.670, beyond the larger std 0.014
    assert cells["mae"].endswith("(+0.040)") and cells["mp3-xavier"] == "0.670 (1 seed)" and cells["droppos"] == "-"


def test_scale_extension_table_sets_part_scale_beside_part_on_finetuning_and_detection(tmp_path, capsys):
    for seed, (part_ap, scale_ap) in enumerate([(40.0, 44.0), (42.0, 46.0)]):
        fake_run(tmp_path / f"seed{seed}" / "det_part", val_AP_box=part_ap, val_AP50_box=60.0)
        fake_run(tmp_path / f"seed{seed}" / "det_part-scale", val_AP_box=scale_ap, val_AP50_box=60.5)
    compare_table.main(tmp_path, ["0", "1"])
    scale = row_cells(capsys.readouterr().out, "Table 1", "part-scale")
    assert scale["AP^b"] == "45.0 ± 1.4 (+4.0)" and scale["AP^b_50"] == "60.5 ± 0.0 (+0.5)"  # beyond both stds
    assert scale["finetune top-1"] == "-" and scale["AP^m"] == "-"


def test_sleep_table_sets_kappa_against_part_but_not_each_methods_own_pretext_metric_and_plots_the_curve(
    tmp_path, capsys
):
    for seed, (part, scratch) in enumerate([(0.58, 0.66), (0.59, 0.68)]):
        runs = tmp_path / "sleep" / f"seed{seed}"
        fake_run(runs / "pre_part", val_loss=136.0 + seed, val_euclid=2.0, val_euclid_zero=2.0)
        fake_run(runs / "pre_mp3", val_pos_acc=0.03 + seed / 100)
        for n, shift in ((2, -0.1), (10, 0.0)):
            fake_run(runs / f"ft_part_n{n}", val_kappa=part + shift)
            fake_run(runs / f"ft_scratch_n{n}", val_kappa=scratch + shift)
    compare_table.main(tmp_path, ["0", "1"])
    text = capsys.readouterr().out
    scratch, mp3 = row_cells(text, "Sleep", "scratch"), row_cells(text, "Sleep", "mp3")
    assert scratch["kappa n=10"] == "0.670 ± 0.014 (+0.085)" and scratch["kappa n=2"] == "0.570 ± 0.014 (+0.085)"
    assert mp3["pretext metric (DropPos, MP3: position acc)"] == "0.035 ± 0.007"  # no gap to PART's MSE
    assert row_cells(text, "Sleep", "part")["held-out Δt error / zero predictor"] == "1.0000 ± 0.0000"
    compare_table.plot_sample_efficiency(tmp_path, ["0", "1"], tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "values, reference, expected",
    [
        ([1.0, 1.2], [1.0, 1.0002], "tie"),  # the gap 0.1 inside the row's own spread (std 0.14), not the reference's
        ([1.0, 1.0002], [1.0, 1.2], "tie"),  # and the other way round
        ([1.3, 1.3002], [1.0, 1.2], "+0.200"),  # beyond both stds (0.14)
        ([0.5, 0.7], [1.0, 1.2], "-0.500"),
        ([1.0], [1.0, 1.2], None),  # one seed: no spread to judge by
    ],
)
def test_the_tie_rule_uses_the_larger_sample_std(values, reference, expected):
    assert compare_table.verdict(values, reference, 3) == expected


def test_search_table_marks_the_chosen_point_and_best_skips_unfinished_runs(tmp_path, capsys):
    search = tmp_path / "search"
    points = {
        "ft_part_blr5e-4_pairs128": 0.70,
        "ft_part_blr1.5e-3_pairs128": 0.75,
        "ft_part_blr4.5e-3_pairs128": 0.72,
        "ft_part_blr1.5e-3_pairs512": 0.78,
        "ft_part_blr1.5e-3_pairs512_seed1": 0.70,  # the pairs sweep's other seeds: 512's mean 0.74 < 0.77
        "ft_part_blr1.5e-3_pairs1024": 0.76,
        "ft_part_blr1.5e-3_pairs1024_seed1": 0.78,
        "ft_part_blr1.5e-3_pairs2048": 0.90,
        "ft_mae_blr1.5e-3": 0.74,
        "ft_mae_blr5e-4": 0.74,
        "ft_mae_blr4.5e-3": float("nan"),
        "ft_mae_blr1e-9": 0.73,  # the control: MAE's init
        "ft_scratch": 0.60,  # the control: no pretraining
    }
    for name, value in points.items():
        fake_run(search / name, epochs_done=1 if name.endswith("pairs2048") else 2, val_acc=value)  # 2048 unfinished
    pick = lambda *groups: compare_table.best([(g[0], [search / n for n in g]) for g in groups])  # noqa: E731
    assert pick(("ft_part_blr1.5e-3_pairs128",), ("ft_part_blr1.5e-3_pairs512",)) == "ft_part_blr1.5e-3_pairs512"
    seeds = lambda k: (f"ft_part_blr1.5e-3_pairs{k}", f"ft_part_blr1.5e-3_pairs{k}_seed1")  # noqa: E731
    assert pick(seeds(512), seeds(1024), ("ft_part_blr1.5e-3_pairs2048",)) == seeds(1024)[0]  # by the mean; 2048 out
    mae = ("ft_mae_blr4.5e-3",), ("ft_mae_blr1.5e-3",), ("ft_mae_blr5e-4",)
    assert pick(*mae) == "ft_mae_blr1.5e-3"  # NaN out; an exact tie: the first
    assert pick(("ft_part_blr1.5e-3_pairs2048",)) is None
    assert compare_table.candidates(["512=a,b,", "5e-4=c"]) == [("512", ["a", "b"]), ("5e-4", ["c"])]  # compare.sh's
    blr = lambda name: compare_table.POINT.match(name)["blr"]  # noqa: E731
    beyond = lambda *names: compare_table.beyond([(blr(n), [search / n]) for n in names])  # noqa: E731
    assert beyond("ft_part_blr5e-4_pairs128", "ft_part_blr1.5e-3_pairs128", "ft_part_blr4.5e-3_pairs128") is None
    assert beyond("ft_part_blr5e-4_pairs128", "ft_part_blr4.5e-3_pairs128") == "1.35e-2"  # the top wins: x3
    assert beyond("ft_part_blr1.5e-3_pairs128", "ft_part_blr4.5e-3_pairs128") == "5e-4"  # the bottom: /3
    (search / "chosen.txt").write_text("part blr 1.5e-3\npart pairs 1024\nmae blr 1.5e-3\n")
    print("\n".join(compare_table.search_table(search)))
    rows = [
        line.strip("|").split("|")
        for line in capsys.readouterr().out.splitlines()
        if line.startswith(("| part", "| mae", "| scratch"))
    ]
    table = {(m.strip(), b.strip(), p.strip()): (acc.strip(), mark.strip()) for m, b, p, acc, mark in rows}
    assert len(table) == len(points) - 2  # a point's seeds share its row
    assert table["mae", "1e-9 (init only)", "-"] == ("0.7300 (1 seed)", "")  # the controls, never chosen
    assert table["scratch (no pretraining)", "-", "-"] == ("0.6000 (1 seed)", "")
    assert {k for k, (_, mark) in table.items() if mark} == {("part", "1.5e-3", "1024"), ("mae", "1.5e-3", "-")}
    assert table["part", "1.5e-3", "2048"][0] == "unfinished" and table["part", "5e-4", "128"][0] == "0.7000 (1 seed)"
    assert table["part", "1.5e-3", "512"][0] == f"0.7400 ± {math.sqrt(2 * 0.04**2):.4f}"  # sample std of 0.78, 0.70


SHOW_OUTPUT = """fashion-mnist_val0: 49 offgrid patches of 4 px, all 2401 ordered pairs predicted
  Figure 4, off-grid reconstruction from reference #12 at (14.1, 13.2): mean placement error 7.47 px = 1.867 reference sizes over 48 targets (all on the reference: 9.52 px = 2.380); over all 2352 pairs 10.83 px = 2.708 (all on the reference: 12.73 px = 3.183)
  Figure 5, patch uncertainty (RMS spread of a patch's 48 predicted centres): median 8.78 px, #37 8.50 px, #2 8.90 px; correlation with the patch's pixel std +0.31
  Figure 6, negative symmetry corr(P, -P^T): dx 0.983 dy 0.982; correlation with the truth: dx 0.290 dy 0.590
"""  # noqa: E501  as train.py show prints it


def test_readme_table_puts_each_quoted_number_beside_the_rerun_at_the_quotes_precision(tmp_path):
    assert set(compare_table.quoted("README.md")) == set(compare_table.README_FIGURES)  # README quotes every one
    fake_run(tmp_path / "pretrain", val_euclid=2.2230, val_euclid_zero=3.061)  # 0.7262...
    fake_run(tmp_path / "finetune", val_acc=0.8004)
    fake_run(tmp_path / "detect", val_AP_box=59.42, val_AP_mask=61.0)
    printed = {"show/show.txt": SHOW_OUTPUT, "bench/bench.txt": BENCH_OUTPUT, "knn/knn.txt": "kNN top-1 0.7581: ..."}
    for name, text in printed.items():
        (tmp_path / name).parent.mkdir()
        (tmp_path / name).write_text(text)
    readme = tmp_path / "README.md"
    quotes = {
        "default run: held-out error / zero predictor": "0.726", "default run: minutes": "5.6",
        "show: corr(P, -P^T), dx": "0.9995", "show: least certain patch": "#2",
        "show: spread vs pixel std, correlation": "+0.31", "bench: PART step (ms)": "438",
        "bench: PART step / bare ViT step": "4.162", "kNN top-1": "0.760", "finetune top-1": "0.800",
        "detection AP^b": "59.4",
    }
    readme.write_text("| figure | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in quotes.items()))
    text = "\n".join(compare_table.readme_table(tmp_path, readme))
    cells = {f: row_cells(text, "README's numbers", f) for f in compare_table.README_FIGURES}
    rerun = {f: (c["rerun"], c[""]) for f, c in cells.items()}
    assert rerun["default run: held-out error / zero predictor"] == ("0.726", "same")
    assert rerun["default run: minutes"] == ("1.0", "differs")  # fake_run's 60 s
    assert rerun["show: corr(P, -P^T), dx"] == ("0.9830", "differs")  # as many decimals as the quote
    assert rerun["show: least certain patch"] == ("#2", "same") and rerun["bench: PART step (ms)"] == ("438", "same")
    assert rerun["show: spread vs pixel std, correlation"] == ("+0.31", "same")
    assert rerun["kNN top-1"] == ("0.758", "differs") and rerun["detection AP^b"] == ("59.4", "same")
    assert rerun["linear probe top-1"] == ("-", "") and cells["linear probe top-1"]["README"] == "not quoted"
