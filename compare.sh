#!/usr/bin/env bash
# The paper's comparisons at CPU scale, on the embedded Fashion-MNIST (README, "Comparisons").
#   bash compare.sh            # every run below, one after another, then the table
#   PY="torchrun --nproc_per_node=8" bash compare.sh   # the same on a bigger machine
# Pretraining: 20k training images, 2 epochs, seed 0. Finetuning: 5k labelled images,
# 10 epochs, seed 0, the same recipe for every row; top-1 on the 10k held-out images.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-out/compare}
PY=${PY:-python}
PRE="--train-subset 20000 --epochs 2 --seed 0"
FT="--train-subset 5000 --epochs 10 --seed 0"

pretrain() {  # name, flags
  $PY train.py pretrain $PRE "${@:2}" --out-dir "$OUT/pre_$1"
  $PY train.py finetune $FT --init "$OUT/pre_$1/checkpoint.pt" --out-dir "$OUT/ft_$1"
}

$PY train.py finetune $FT --init scratch --out-dir "$OUT/ft_scratch"  # Tables 6/7: supervised from scratch
[ -f out/pretrain/checkpoint.pt ] || $PY train.py pretrain                # the default run: 60k images, 3 epochs
$PY train.py finetune $FT --init out/pretrain/checkpoint.pt --out-dir "$OUT/ft_default"
pretrain offgrid                                                         # PART: cross-attention, 128 pairs
pretrain grid --sampler grid                                             # Table 4: PART-grid
pretrain pairwise-mlp --head pairwise-mlp                                # Table 5: relative encoders
pretrain mlp --head mlp
pretrain pairs32 --pairs 32                                              # Figure 8: number of pairs
pretrain pairs512 --pairs 512
LIGHT="--randaug-n 0 --reprob 0"                                         # the same without RandAugment / RandomErasing
$PY train.py finetune $FT $LIGHT --init scratch --out-dir "$OUT/ft_scratch_light"
$PY train.py finetune $FT $LIGHT --init out/pretrain/checkpoint.pt --out-dir "$OUT/ft_default_light"
$PY train.py finetune $FT $LIGHT --init "$OUT/pre_offgrid/checkpoint.pt" --out-dir "$OUT/ft_offgrid_light"

python - "$OUT" <<'PY'
import json, sys
from pathlib import Path

def last(run, key):
    rows = [json.loads(l) for l in open(run / "log.jsonl")] if (run / "log.jsonl").exists() else []
    values = [r[key] for r in rows if key in r]
    return f"{values[-1]:.3f}" if values else "-"

out = Path(sys.argv[1])
print("| run | val mae_x | val mae_y | val euclid | euclid of zero | finetune top-1 |")
print("|---|---|---|---|---|---|")
rows = {name: (out / f"pre_{name}", out / f"ft_{name}") for name in ["offgrid", "grid", "pairwise-mlp", "mlp", "pairs32", "pairs512"]}
rows = {"scratch": (out / "none", out / "ft_scratch"), "default": (Path("out/pretrain"), out / "ft_default"), **rows,
        "scratch, light": (out / "none", out / "ft_scratch_light"), "default, light": (Path("out/pretrain"), out / "ft_default_light"),
        "offgrid, light": (out / "pre_offgrid", out / "ft_offgrid_light")}
for name, (pre, ft) in rows.items():
    cells = [last(pre, k) for k in ("val_mae_x", "val_mae_y", "val_euclid", "val_euclid_zero")]
    print(f"| {name} | " + " | ".join(cells) + f" | {last(ft, 'val_acc')} |")
PY
