#!/usr/bin/env bash
# The paper's comparisons at CPU scale, every cell over 3 seeds, mean ± std (README, "Comparisons").
#   bash compare.sh methods     # scratch, PART, MAE, DropPos: finetune, linear probe and kNN top-1 on Fashion-MNIST, nuclei AP
#   bash compare.sh sleep       # 1D: scratch, PART under both readings of 8.1, MAE, DropPos: Δt error, kappa, sample efficiency
#   bash compare.sh ablations   # PART's own rows: the default run, samplers and heads (Tables 4 and 5)
#   bash compare.sh all         # methods, then sleep: every cell of the README's methods table
#   bash compare.sh table       # the tables of every run finished so far
#   SEEDS="0" bash compare.sh methods                        # one seed
#   PY="torchrun --nproc_per_node=8" bash compare.sh methods # the same on a bigger machine
# Finished runs are skipped on a rerun (each resumes from its own checkpoint). Budgets, chosen so that
# `methods` and `sleep` together take about 2 hours on 2 CPU cores (README, "Comparisons"):
#   Fashion-MNIST: pretraining 20k images x 2 epochs for every method, the same vit_mini/4, batch, lr and
#   schedule; finetuning 5k labelled images x 10 epochs (train.py finetune's defaults), linear probe
#   5k x 3 epochs, kNN over the 60k training images; top-1 on the 10k test images.
#   Nuclei (detect.py's default data): 3 epochs (lr x0.1 at 2 and 2.75), scratch with the encoders' inputs.
#   Sleep (synthetic): pretraining 15 epochs on the 20 subjects outside the 20 finetuning and 10 test ones,
#   --pairs 512 for both PART readings; finetuning 20 epochs on 10 subjects (360 steps), and for the curve
#   on 2, 5 and 20 subjects with the epochs that give about as many steps (100, 40, 10 epochs: 300, 360, 370 steps).
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-out/compare}
PY=${PY:-python}
SEEDS=${SEEDS:-"0 1 2"}
METHODS="part mae droppos"

finetune() {  # out dir, init ("scratch" or a checkpoint), flags
  $PY train.py finetune --init "$2" --train-subset 5000 "${@:3}" --out-dir "$1"
}

methods() {
  for S in $SEEDS; do
    for M in $METHODS; do
      $PY train.py pretrain --method "$M" --train-subset 20000 --epochs 2 --seed "$S" --out-dir "$OUT/seed$S/pre_$M"
    done
  done
  for S in $SEEDS; do
    D="$OUT/seed$S"
    [ -s "$D/knn_scratch.txt" ] || $PY train.py knn --ckpt "$D/pre_part/checkpoint.pt" --random-init > "$D/knn_scratch.txt"
    for M in $METHODS; do [ -s "$D/knn_$M.txt" ] || $PY train.py knn --ckpt "$D/pre_$M/checkpoint.pt" > "$D/knn_$M.txt"; done
  done
  for S in $SEEDS; do
    D="$OUT/seed$S"
    finetune "$D/ft_scratch" scratch --epochs 10 --seed "$S"
    for M in $METHODS; do finetune "$D/ft_$M" "$D/pre_$M/checkpoint.pt" --epochs 10 --seed "$S"; done
  done
  for S in $SEEDS; do
    D="$OUT/seed$S"
    finetune "$D/probe_scratch" scratch --linear-probe --epochs 3 --seed "$S"
    for M in $METHODS; do finetune "$D/probe_$M" "$D/pre_$M/checkpoint.pt" --linear-probe --epochs 3 --seed "$S"; done
  done
  DET="--epochs 3 --lr-drops 2,2.75"
  for S in $SEEDS; do
    D="$OUT/seed$S"
    $PY detect.py --init scratch --in-chans 1 --mean 0.286 --std 0.353 $DET --seed "$S" --out-dir "$D/det_scratch"
    for M in $METHODS; do $PY detect.py --init "$D/pre_$M/checkpoint.pt" $DET --seed "$S" --out-dir "$D/det_$M"; done
  done
}

sleep_study() {
  SPLIT="--finetune-subjects 20"  # pretraining never sees the 20 subjects the curve finetunes on, nor the 10 test ones
  for S in $SEEDS; do
    D="$OUT/sleep/seed$S"
    $PY sleep1d.py pretrain $SPLIT --pairs 512 --epochs 15 --seed "$S" --out-dir "$D/pre_part"                      # today's reading
    $PY sleep1d.py pretrain $SPLIT --pairs 512 --pos-mask 0.2 --epochs 15 --seed "$S" --out-dir "$D/pre_part-posmask" # the other
    $PY sleep1d.py pretrain $SPLIT --method mae --epochs 15 --seed "$S" --out-dir "$D/pre_mae"
    $PY sleep1d.py pretrain $SPLIT --method droppos --epochs 15 --seed "$S" --out-dir "$D/pre_droppos"
  done
  stage() {  # name, init, subjects, seed, flags
    local D="$OUT/sleep/seed$4" init="$2"; [ "$init" = scratch ] || init="$OUT/sleep/seed$4/pre_$2/checkpoint.pt"
    $PY sleep1d.py finetune --init "$init" --finetune-subjects "$3" --seed "$4" "${@:5}" --out-dir "$D/ft_$1_n$3"
  }
  for S in $SEEDS; do
    for I in scratch part part-posmask mae droppos; do stage "$I" "$I" 10 "$S"; done
  done
  for N in 2 5 20; do  # 8.2's sample efficiency: kappa against the number of finetuning subjects, at about the same number of steps
    for S in $SEEDS; do
      for I in scratch part part-posmask; do stage "$I" "$I" "$N" "$S" --epochs $((200 / N)); done
    done
  done
  for S in $SEEDS; do  # 5.2's "longer sequences": windows over 2 consecutive epochs, position masking as above
    D="$OUT/sleep/seed$S"
    $PY sleep1d.py pretrain $SPLIT --pairs 512 --pos-mask 0.2 --context 2 --num-patches 80 --epochs 15 --seed "$S" \
        --out-dir "$D/pre_part-posmask-context2"
    stage part-posmask-context2 part-posmask-context2 10 "$S"
  done
}

ablations() {
  for S in $SEEDS; do
    D="$OUT/seed$S"
    pretrain() {  # name, flags: a 20k x 2 pretraining and its finetuning
      $PY train.py pretrain --train-subset 20000 --epochs 2 --seed "$S" "${@:2}" --out-dir "$D/pre_$1"
      finetune "$D/ft_$1" "$D/pre_$1/checkpoint.pt" --epochs 10 --seed "$S"
    }
    $PY train.py pretrain --seed "$S" --out-dir "$D/pre_default"             # the default run: 60k images, 3 epochs
    finetune "$D/ft_default" "$D/pre_default/checkpoint.pt" --epochs 10 --seed "$S"
    [ -s "$D/knn_default.txt" ] || $PY train.py knn --ckpt "$D/pre_default/checkpoint.pt" > "$D/knn_default.txt"
    pretrain residual --head cross-attention-residual                        # not the paper's: a residual around the attention
    pretrain grid --sampler grid                                             # Table 4: PART-grid
    pretrain pairwise-mlp --head pairwise-mlp                                # Table 5: relative encoders
    pretrain mlp --head mlp
  done
}

case "${1:-}" in
  methods) methods ;;
  sleep) sleep_study ;;
  ablations) ablations ;;
  all) methods; sleep_study ;;
  table) ;;
  *) echo "usage: bash compare.sh methods|sleep|ablations|all|table" >&2; exit 2 ;;
esac
python compare_table.py "$OUT" $SEEDS
