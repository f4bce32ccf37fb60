#!/usr/bin/env bash
# The paper's comparisons at CPU scale, each method at its searched learning rate, every cell over 3 seeds,
# mean ± std (README, "Comparisons"; issue 22).
#   bash studies/compare.sh search      # per method, pretraining blr of 3 (then PART's pairs of 5) by finetune top-1 on held-out training images
#   bash studies/compare.sh methods     # scratch, PART, MP3, MAE, DropPos at the search's values: finetune, linear probe, kNN, nuclei AP, step cost
#   bash studies/compare.sh sleep       # 1D: scratch, PART under both readings of 8.1, MP3, MAE, DropPos: Δt error, kappa, sample efficiency
#   bash studies/compare.sh scale       # Table 1: PART's scale extension (--sampler offgrid-scale) beside PART: finetune, nuclei AP
#   bash studies/compare.sh init        # one init for every row: scratch, PART and MP3 after --xavier-init (MAE's): finetune, nuclei AP
#   bash studies/compare.sh ablations   # PART's own rows: the default run, samplers and heads (Tables 4 and 5)
#   bash studies/compare.sh all         # search, methods, sleep, scale, then init: every cell of the README's methods tables
#   bash studies/compare.sh table       # the tables of every run finished so far, the search's among them
#   bash studies/compare.sh readme      # every figure README.md and its docs/ pages quote, rerun with the defaults, beside them
#   SEEDS="0" bash studies/compare.sh methods                        # one seed (the search's blr runs the first of SEEDS)
#   OUT=/scratch/compare bash studies/compare.sh all                 # another folder (default out/compare)
#   TINY=1 bash studies/compare.sh search                            # the tooling end to end in seconds a run (out/compare-tiny); numbers mean nothing
#   METHODS="part mp3" bash studies/compare.sh search                # some of the methods
#   PY="torchrun --nproc_per_node=8" bash studies/compare.sh methods # the same on a bigger machine
# Skipping and resuming: a run whose folder holds compare.done naming this same command is skipped at once; any
# other is started, and the engine resumes it from its own checkpoint (one already finished exits at once), so an
# interrupted study resumes where it stopped. To redo a run, delete its folder and those of the runs that start from it.
# The search (issue 22, the paper's 8.1: "the best result for each experiment"): pretraining and finetuning on the
# training images less 10k held out (--val-from-train, the same 10k for every run), selected by finetune top-1 on
# those 10k, never on the test images. First blr in {default/3, default, 3 x default} per method, one seed, PART at
# today's pairs; where an end of that grid wins, the next blr past it (x3 or /3), up to twice, so that every method's
# choice has a worse point on each side (the same rule for every method); then PART's pairs in {128, 256, 512, 1024,
# 2048} at its chosen blr over every seed (Figure 8's sweep), chosen by the mean. Two controls beside them, never
# chosen: scratch (no pretraining) and each method at blr 1e-9 (its encoder as initialised, with what it hands to
# finetuning, such as MAE's and DropPos' sin-cos positions), so that the table shows what pretraining adds.
# OUT/search/chosen.txt keeps the choice; methods and ablations read it (today's defaults, with a note, where it is
# missing), so run the search first: a methods run started at other values stops (the engine refuses to resume another
# recipe); delete it to rerun it.
# Sleep keeps sleep1d.py's recipe: its 1D runs are not searched.
# Budgets, chosen so that `methods` and `sleep` together took about 2 hours on 2 CPU cores before MP3 (README):
#   Fashion-MNIST: pretraining 20k images x 2 epochs for every method, the same vit_mini/4, batch and schedule;
#   finetuning 5k labelled images x 10 epochs (train.py finetune's defaults), linear probe 5k x 3 epochs, kNN over
#   the 60k training images; top-1 on the 10k test images.
#   Nuclei (detect.py's default data): 3 epochs (lr x0.1 at 2 and 2.75), scratch with the encoders' inputs.
#   Sleep (synthetic): pretraining 15 epochs on the 20 subjects outside the 20 finetuning and 10 test ones,
#   --pairs 512 for both PART readings; finetuning 20 epochs on 10 subjects (360 steps), and for the curve
#   on 2, 5 and 20 subjects with the epochs that give about as many steps (100, 40, 10 epochs: 300, 360, 370 steps).
set -euo pipefail
cd "$(dirname "$0")/.."  # the commands run from the repository root
PY=${PY:-python}
SEEDS=${SEEDS:-"0 1 2"}
FIRST=${SEEDS%% *}                  # the search's one seed (blr grids, controls)
METHODS=${METHODS:-"part mp3 mae droppos"}
BLR_DEFAULT=1.5e-3                  # train.py pretrain's --blr
BLRS="$BLR_DEFAULT 5e-4 4.5e-3"     # default first: on an exact tie it stays
BLR_INIT=1e-9                       # a control, never chosen: the encoder as initialised (the blr barely moves it)
PAIRS_DEFAULT=128                   # train.py pretrain's --pairs
PAIRS="$PAIRS_DEFAULT 256 512 1024 2048"  # Figure 8's 512-4096 where they fit the 49^2 = 2401 ordered pairs of 28 px / 4
if [ -n "${TINY:-}" ]; then  # every run a few steps of vit_test: a check of the tooling, not of the methods
  OUT=${OUT:-out/compare-tiny}
  PRE="--preset vit_test --train-subset 512 --epochs 1"; DEFAULT_RUN=$PRE; VAL=256
  FT="--train-subset 512 --epochs 1"; PROBE="--train-subset 512 --epochs 1"; SCRATCH="--preset vit_test"
  DET="--epochs 1 --lr-drops 0.7,0.9"; BENCH="--preset vit_test --batch-size 32 --steps 2"
  SLEEP_PRE="--epochs 1"; SLEEP_FT="--epochs 1"; CURVE_STEPS=20
  README_FT="--train-subset 512 --epochs 1"; README_DET=$DET; README_BENCH=$BENCH
else
  OUT=${OUT:-out/compare}
  PRE="--train-subset 20000 --epochs 2"; DEFAULT_RUN=""; VAL=10000
  FT="--train-subset 5000 --epochs 10"; PROBE="--train-subset 5000 --epochs 3"; SCRATCH=""
  DET="--epochs 3 --lr-drops 2,2.75"; BENCH="--steps 20"
  SLEEP_PRE="--epochs 15"; SLEEP_FT=""; CURVE_STEPS=200
  README_FT=""; README_DET=""; README_BENCH=""  # the commands' own defaults
fi
SCRATCH_DET="$SCRATCH --in-chans 1 --mean 0.286 --std 0.353"  # scratch detection reads the nuclei as the pretrainings do

once() {  # run folder, command...: the command, unless the folder holds compare.done naming this same command
  local dir=$1; shift
  if [ -f "$dir/compare.done" ] && [ "$(< "$dir/compare.done")" = "$*" ]; then echo "finished: $dir"; return; fi
  "$@" || return
  mkdir -p "$dir" && echo "$*" > "$dir/compare.done"
}

into() {  # file, command...: the command's output into the file, whole or not at all
  mkdir -p "$(dirname "$1")"
  "${@:2}" > "$1.tmp" && mv "$1.tmp" "$1"
}

finetune() {  # out dir, init ("scratch" or a checkpoint), flags
  $PY train.py finetune --init "$2" "${@:3}" --out-dir "$1"
}

# ---------------------------------------------------------------- search

point() {  # method, blr, pairs[, seed]: the name of a search point's folders (pairs in PART's alone; a seed other
  # than the first named), parsed by compare_table.POINT
  local seed=""; [ "${4:-$FIRST}" = "$FIRST" ] || seed="_seed$4"
  if [ "$1" = part ]; then echo "part_blr$2_pairs$3$seed"; else echo "$1_blr$2$seed"; fi
}

search_point() {  # method, blr, pairs[, seed]: pretraining and its finetuning, both without the VAL held-out training
  # images; the first of SEEDS unless given
  local D="$OUT/search" S=${4:-$FIRST} name; name=$(point "$@")
  local pairs=(); [ "$1" = part ] && pairs=(--pairs "$3")
  if ! once "$D/pre_$name" $PY train.py pretrain --method "$1" --blr "$2" "${pairs[@]}" $PRE --val-from-train $VAL --seed "$S" \
      --out-dir "$D/pre_$name"; then
    echo "note: $D/pre_$name failed (the message above says why: a blr that diverges, a resume refused); left out of the choice" >&2
    return
  fi
  once "$D/ft_$name" finetune "$D/ft_$name" "$D/pre_$name/checkpoint.pt" $FT --val-from-train $VAL --seed "$S" ||
    echo "note: $D/ft_$name failed; left out of the choice" >&2
}

search() {
  local D="$OUT/search" M B K N S grid chosen=() candidates m key value
  once "$D/ft_scratch" finetune "$D/ft_scratch" scratch $SCRATCH $FT --val-from-train $VAL --seed "$FIRST" ||
    echo "note: $D/ft_scratch (a control) failed" >&2
  for M in $METHODS; do  # 1. blr, PART at today's pairs; an end of the grid that wins is passed by x3, twice at most
    candidates=(); grid=$BLRS
    for N in 0 1 2; do  # the grid, then at most two points past the end that wins
      for B in $grid; do
        search_point "$M" "$B" "$PAIRS_DEFAULT"
        candidates+=("$B=$D/ft_$(point "$M" "$B" "$PAIRS_DEFAULT")")
      done
      grid=$(python studies/compare_table.py --beyond "${candidates[@]}")
      [ -n "$grid" ] || break
    done
    B=$(python studies/compare_table.py --best "${candidates[@]}")
    if [ -n "$B" ]; then chosen+=("$M blr $B"); else echo "note: no $M point finished; $M keeps the default blr" >&2; fi
    search_point "$M" "$BLR_INIT" "$PAIRS_DEFAULT"  # what its init alone gives, beside what its pretraining adds
  done
  if [[ " $METHODS " == *" part "* ]]; then  # 2. PART's pairs at its chosen blr, every seed (Figure 8's sweep)
    B=$(printf '%s\n' "${chosen[@]}" | awk '$1 == "part" && $2 == "blr" {print $3}')
    B=${B:-$BLR_DEFAULT}
    candidates=()
    for S in $SEEDS; do
      for K in $PAIRS; do search_point part "$B" "$K" "$S"; done
    done
    for K in $PAIRS; do
      candidates+=("$K=$(for S in $SEEDS; do printf '%s,' "$D/ft_$(point part "$B" "$K" "$S")"; done)")
    done
    K=$(python studies/compare_table.py --best "${candidates[@]}")
    if [ -n "$K" ]; then chosen+=("part pairs $K"); else echo "note: no PART pairs point finished; PART keeps the default pairs" >&2; fi
  fi
  if [ -f "$D/chosen.txt" ]; then  # the choices of methods not searched this time stay
    while read -r m key value; do [[ -z "$m" || " $METHODS " == *" $m "* ]] || chosen+=("$m $key $value"); done < "$D/chosen.txt"
  fi
  into "$D/chosen.txt" printf '%s\n' "${chosen[@]}"
  echo "chosen ($D/chosen.txt):"; cat "$D/chosen.txt"
}

choice() {  # method, blr or pairs, default: the search's choice, or the default with a note
  local value=""
  [ -f "$OUT/search/chosen.txt" ] && value=$(awk -v m="$1" -v k="$2" '$1 == m && $2 == k {print $3}' "$OUT/search/chosen.txt")
  if [ -z "$value" ]; then
    echo "note: no $1 $2 in $OUT/search/chosen.txt (bash studies/compare.sh search); $1 runs at the default $2 $3" >&2
    value=$3
  fi
  echo "$value"
}

pretrain_flags() {  # method: its chosen blr, and PART's chosen pairs
  local flags="--blr $(choice "$1" blr "$BLR_DEFAULT")"
  [ "$1" = part ] && flags+=" --pairs $(choice part pairs "$PAIRS_DEFAULT")"
  echo "$flags"
}

# ---------------------------------------------------------------- the studies

methods() {  # the paper's two columns first (finetune, detection), then the frozen encoders' (probe; kNN is quick)
  local S D M; declare -A flags
  for M in $METHODS; do flags[$M]=$(pretrain_flags "$M"); done
  for S in $SEEDS; do
    for M in $METHODS; do
      once "$OUT/seed$S/pre_$M" $PY train.py pretrain --method "$M" ${flags[$M]} $PRE --seed "$S" --out-dir "$OUT/seed$S/pre_$M"
    done
  done
  once "$OUT/bench" into "$OUT/bench/methods.txt" python train.py bench --methods \
      --pairs "$(choice part pairs "$PAIRS_DEFAULT" 2>/dev/null)" $BENCH
  for S in $SEEDS; do
    D="$OUT/seed$S"
    once "$D/knn_scratch" into "$D/knn_scratch/knn.txt" $PY train.py knn --ckpt "$D/pre_part/checkpoint.pt" --random-init
    for M in $METHODS; do once "$D/knn_$M" into "$D/knn_$M/knn.txt" $PY train.py knn --ckpt "$D/pre_$M/checkpoint.pt"; done
  done
  for S in $SEEDS; do
    D="$OUT/seed$S"
    once "$D/ft_scratch" finetune "$D/ft_scratch" scratch $SCRATCH $FT --seed "$S"
    for M in $METHODS; do once "$D/ft_$M" finetune "$D/ft_$M" "$D/pre_$M/checkpoint.pt" $FT --seed "$S"; done
  done
  for S in $SEEDS; do
    detection "$S" scratch scratch $SCRATCH_DET
    for M in $METHODS; do detection "$S" "$M" "$M"; done
  done
  for S in $SEEDS; do
    D="$OUT/seed$S"
    once "$D/probe_scratch" finetune "$D/probe_scratch" scratch $SCRATCH --linear-probe $PROBE --seed "$S"
    for M in $METHODS; do once "$D/probe_$M" finetune "$D/probe_$M" "$D/pre_$M/checkpoint.pt" --linear-probe $PROBE --seed "$S"; done
  done
}

sleep_stage() {  # name, init (scratch or a pretraining's name), subjects, seed, flags: a finetuning on the synthetic nights
  local D="$OUT/sleep/seed$4" init=$2
  [ "$init" = scratch ] || init="$D/pre_$2/checkpoint.pt"
  once "$D/ft_$1_n$3" $PY sleep1d.py finetune --init "$init" --finetune-subjects "$3" --seed "$4" "${@:5}" --out-dir "$D/ft_$1_n$3"
}

sleep_study() {
  local SPLIT="--finetune-subjects 20" S D I N  # pretraining never sees the 20 subjects the curve finetunes on, nor the 10 test ones
  local INITS="scratch part part-posmask mp3 mae droppos"
  for S in $SEEDS; do
    D="$OUT/sleep/seed$S"
    once "$D/pre_part" $PY sleep1d.py pretrain $SPLIT --pairs 512 $SLEEP_PRE --seed "$S" --out-dir "$D/pre_part"  # today's reading
    once "$D/pre_part-posmask" $PY sleep1d.py pretrain $SPLIT --pairs 512 --pos-mask 0.2 $SLEEP_PRE --seed "$S" \
        --out-dir "$D/pre_part-posmask"                                                                          # the other
    for M in mp3 mae droppos; do
      once "$D/pre_$M" $PY sleep1d.py pretrain $SPLIT --method "$M" $SLEEP_PRE --seed "$S" --out-dir "$D/pre_$M"
    done
  done
  for S in $SEEDS; do
    for I in $INITS; do sleep_stage "$I" "$I" 10 "$S" $SLEEP_FT; done
  done
  for N in 2 5 20; do  # 8.2's sample efficiency: kappa against the number of finetuning subjects, at about the same number of steps
    for S in $SEEDS; do
      for I in $INITS; do sleep_stage "$I" "$I" "$N" "$S" --epochs $((CURVE_STEPS / N)); done
    done
  done
  for S in $SEEDS; do  # 5.2's "longer sequences": windows over 2 consecutive epochs, position masking as above
    D="$OUT/sleep/seed$S"
    once "$D/pre_part-posmask-context2" $PY sleep1d.py pretrain $SPLIT --pairs 512 --pos-mask 0.2 --context 2 --num-patches 80 $SLEEP_PRE \
        --seed "$S" --out-dir "$D/pre_part-posmask-context2"
    sleep_stage part-posmask-context2 part-posmask-context2 10 "$S" $SLEEP_FT
  done
}

scale_extension() {  # Table 1: PART pretrained on patches of random sizes and aspect ratios (5.1 ii), also regressing
  # dw, dh, at PART's chosen values, beside `methods`' part row on the same finetuning and detection
  local S
  for S in $SEEDS; do
    variant "$S" part-scale part --sampler offgrid-scale
    detection "$S" part-scale part-scale
  done
}

one_init() {  # finetuning and detection with every row on one init, MAE's and DropPos' official one: scratch, PART
  # and MP3 with --xavier-init (their own is DeiT's), at the search's values (chosen with their own init)
  local S M
  for S in $SEEDS; do
    once "$OUT/seed$S/ft_scratch-xavier" finetune "$OUT/seed$S/ft_scratch-xavier" scratch $SCRATCH --xavier-init $FT \
        --seed "$S"
    for M in part mp3; do variant "$S" "$M-xavier" "$M" --xavier-init; done
  done
  for S in $SEEDS; do
    detection "$S" scratch-xavier scratch $SCRATCH_DET --xavier-init
    for M in part mp3; do detection "$S" "$M-xavier" "$M-xavier"; done
  done
}

detection() {  # seed, name, init (scratch or a pretraining's name), flags: a Mask R-CNN run on the nuclei at $DET
  local D="$OUT/seed$1" init=scratch
  [ "$3" = scratch ] || init="$D/pre_$3/checkpoint.pt"
  once "$D/det_$2" $PY detect.py --init "$init" "${@:4}" $DET --seed "$1" --out-dir "$D/det_$2"
}

variant() {  # seed, name, method, flags: a pretraining of the method at the methods' budget and its chosen values, with
  # the flags that make the variant, and its finetuning (PART's ablations, Table 1's extension, the one-init rows)
  local D="$OUT/seed$1"
  once "$D/pre_$2" $PY train.py pretrain --method "$3" $(pretrain_flags "$3" 2>/dev/null) $PRE --seed "$1" "${@:4}" \
      --out-dir "$D/pre_$2"
  once "$D/ft_$2" finetune "$D/ft_$2" "$D/pre_$2/checkpoint.pt" $FT --seed "$1"
}

ablations() {
  local S D
  pretrain_flags part > /dev/null  # its notes, once
  for S in $SEEDS; do
    D="$OUT/seed$S"
    once "$D/pre_default" $PY train.py pretrain $DEFAULT_RUN --seed "$S" --out-dir "$D/pre_default"  # the default run: 60k images, 3 epochs
    once "$D/ft_default" finetune "$D/ft_default" "$D/pre_default/checkpoint.pt" $FT --seed "$S"
    once "$D/knn_default" into "$D/knn_default/knn.txt" $PY train.py knn --ckpt "$D/pre_default/checkpoint.pt"
    variant "$S" grid part --sampler grid                       # Table 4: PART-grid
    variant "$S" pairwise-mlp part --head pairwise-mlp          # Table 5: relative encoders
    variant "$S" mlp part --head mlp
  done
}

readme() {  # each command with its defaults, seed 0, as README.md runs them; compare_table.py --readme compares
  local D="$OUT/readme" C
  C="$D/pretrain/checkpoint.pt"
  once "$D/pretrain" $PY train.py pretrain $DEFAULT_RUN --out-dir "$D/pretrain"
  once "$D/show" into "$D/show/show.txt" python train.py show --ckpt "$C" --out-dir "$D/show"
  once "$D/bench" into "$D/bench/bench.txt" python train.py bench $README_BENCH
  once "$D/knn" into "$D/knn/knn.txt" $PY train.py knn --ckpt "$C"
  once "$D/finetune" $PY train.py finetune --init "$C" $README_FT --out-dir "$D/finetune"
  once "$D/probe" $PY train.py finetune --init "$C" --linear-probe $README_FT --out-dir "$D/probe"
  once "$D/detect" $PY detect.py --init "$C" $README_DET --out-dir "$D/detect"
  python studies/compare_table.py --readme "$D"
}

case "${1:-}" in
  search) search ;;
  methods) methods ;;
  sleep) sleep_study ;;
  ablations) ablations ;;
  scale) scale_extension ;;
  init) one_init ;;
  all) search; methods; sleep_study; scale_extension; one_init ;;
  readme) readme; exit ;;
  table) ;;
  *) echo "usage: bash studies/compare.sh search|methods|sleep|scale|init|ablations|all|table|readme" >&2; exit 2 ;;
esac
python studies/compare_table.py "$OUT" $SEEDS
