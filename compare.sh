#!/usr/bin/env bash
# The paper's comparisons at CPU scale, on the embedded Fashion-MNIST, 3 seeds (README, "Comparisons").
#   bash compare.sh                      # every run below, one after another, then the table (mean ± std)
#   SEEDS="0" bash compare.sh            # one seed
#   PY="torchrun --nproc_per_node=8" bash compare.sh   # the same on a bigger machine
# Every row, PART or scratch, finetunes with one recipe: 5k labelled images, 10 epochs, the default
# `train.py finetune` flags (DeiT's, no layer decay); top-1 on the 10k held-out images.
# Pretraining: the default run (60k images, 3 epochs) and the ablation rows (20k images, 2 epochs).
# Finished runs are skipped on a rerun (each resumes from its own checkpoint).
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-out/compare}
PY=${PY:-python}
SEEDS=${SEEDS:-"0 1 2"}

for S in $SEEDS; do
  D="$OUT/seed$S"
  FT="--train-subset 5000 --epochs 10 --seed $S"
  finetune() {  # name, pretraining dir or "scratch"
    local init="$2"; [ "$init" = scratch ] || init="$2/checkpoint.pt"
    $PY train.py finetune $FT --init "$init" --out-dir "$D/ft_$1"
  }
  pretrain() {  # name, flags: a 20k x 2 pretraining and its finetuning
    $PY train.py pretrain --train-subset 20000 --epochs 2 --seed "$S" "${@:2}" --out-dir "$D/pre_$1"
    finetune "$1" "$D/pre_$1"
  }
  finetune scratch scratch                                                 # Tables 6/7: supervised from scratch
  $PY train.py pretrain --seed "$S" --out-dir "$D/pre_default"             # the default run: 60k images, 3 epochs
  finetune default "$D/pre_default"
  [ -s "$D/knn_default.txt" ] || $PY train.py knn --ckpt "$D/pre_default/checkpoint.pt" > "$D/knn_default.txt"
  pretrain offgrid                                                         # PART: the paper's cross-attention head, 128 pairs
  pretrain residual --head cross-attention-residual                        # not the paper's: a residual around the attention
  pretrain grid --sampler grid                                             # Table 4: PART-grid
  pretrain pairwise-mlp --head pairwise-mlp                                # Table 5: relative encoders
  pretrain mlp --head mlp
done

python - "$OUT" $SEEDS <<'PY'
import json, re, statistics, sys
from pathlib import Path

out, seeds = Path(sys.argv[1]), sys.argv[2:]

def last(path, key):
    """The last value of key in a run's log.jsonl, or None."""
    rows = [json.loads(line) for line in open(path / "log.jsonl")] if (path / "log.jsonl").exists() else []
    values = [r[key] for r in rows if key in r]
    return values[-1] if values else None

def minutes(path):
    rows = [json.loads(line) for line in open(path / "log.jsonl")] if (path / "log.jsonl").exists() else []
    return sum(r["epoch_s"] for r in rows if "epoch_s" in r) / 60 or None

def knn(path):
    text = path.read_text() if path.exists() else ""
    match = re.search(r"kNN top-1 ([0-9.]+)", text)
    return float(match.group(1)) if match else None

def cell(values, digits=3):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f} (1 seed)"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"

print(f"seeds {' '.join(seeds)}; mean ± sample std over seeds")
print("| row | pretraining min | val mse_x | val mse_y | val euclid | euclid / zero | kNN top-1 | finetune top-1 |")
print("|---|---|---|---|---|---|---|---|")
for name in ["scratch", "default", "offgrid", "residual", "grid", "pairwise-mlp", "mlp"]:
    pre = [out / f"seed{s}" / f"pre_{name}" for s in seeds]
    ratio = [last(p, "val_euclid") / last(p, "val_euclid_zero") if last(p, "val_euclid") else None for p in pre]
    cells = [cell([minutes(p) for p in pre], 1)] + [cell([last(p, k) for p in pre]) for k in ("val_mse_x", "val_mse_y", "val_euclid")]
    cells += [cell(ratio), cell([knn(out / f"seed{s}" / f"knn_{name}.txt") for s in seeds])]
    cells.append(cell([last(out / f"seed{s}" / f"ft_{name}", "val_acc") for s in seeds]))
    print(f"| {name} | " + " | ".join(cells) + " |")
PY
