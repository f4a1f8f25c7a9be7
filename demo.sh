#!/usr/bin/env bash
# The whole DeSD pipeline on a laptop CPU, on synthetic CT, in about 13 minutes on 2 cores:
#   synthetic DeepLesion-format data -> PNG to NIfTI -> 1 mm -> 24-slice sub-volumes
#   -> DeSD pre-training and the DINO baseline (--stage_weights 0 0 0 1), each logging the
#      label-free view retrieval of held-out sub-volumes every epoch
#   -> the comparison of random init, DINO and DeSD per stage, over seeds: view retrieval,
#      linear probes (clean and through the intensity augmentation), k-NN
#   -> fine-tuning from scratch, DINO and DeSD at equal steps, over seeds -> curves PNG.
#
#   bash demo.sh
#   DEMO_PRETRAIN_SEEDS="0 1 2" bash demo.sh     # also over pre-training seeds (~30 min)
#
# DEMO SETTINGS, not the published run (run_ssl.sh is that): a small batch on a CPU needs
# a faster teacher (--momentum_teacher 0.98), a sharper teacher (--teacher_temp 0.02),
# BatchNorm in the heads (without it the outputs stop depending on the input at batch 16),
# a small out_dim and heads, 16x48x48 crops and a few hundred iterations. The method's
# code is the published method's.
#
# Environment variables (defaults in brackets):
#   DEMO_OUT            where everything goes                              [<repo>/demo_output]
#   DEMO_SERIES         synthetic CT series for pre-training               [48]
#   DEMO_HELDOUT        held-out series for the view retrieval             [24]
#   DEMO_SIZE           in-plane pixels of the synthetic CT                [128]
#   DEMO_ARCH           backbone                                           [res3d10]
#   DEMO_EPOCHS         pre-training epochs                                [8]
#   DEMO_BATCH          pre-training batch                                 [16]
#   DEMO_PRETRAIN_SEEDS pre-training seeds of DeSD and of DINO             [0]
#   DEMO_SEEDS          probe, retrieval and fine-tuning seeds             [0 1 2]
#   DEMO_LABELLED       labelled cases for the probes and fine-tuning      [12]
#   DEMO_FT_SIZE        in-plane size of the labelled cases                [96]
#   DEMO_FT_EPOCHS      fine-tuning epochs                                 [4]
#   DEMO_FT_ITERS       fine-tuning iterations per epoch                   [10]
#   DEMO_UPPER_STEPS    >0: also probe an encoder fine-tuned with labels for [0]
#                       this many steps: the probes' supervised upper bound
#   DEMO_PROBE_ARGS     extra arguments for tools/eval_probe.py            []
#   DEMO_THREADS        CPU threads for PyTorch                            [all cores]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
OUT=${DEMO_OUT:-$here/demo_output}
SERIES=${DEMO_SERIES:-48}
HELDOUT=${DEMO_HELDOUT:-24}
SIZE=${DEMO_SIZE:-128}
ARCH=${DEMO_ARCH:-res3d10}
EPOCHS=${DEMO_EPOCHS:-8}
BATCH=${DEMO_BATCH:-16}
read -r -a PSEEDS <<< "${DEMO_PRETRAIN_SEEDS:-0}"
read -r -a SEEDS <<< "${DEMO_SEEDS:-0 1 2}"
LABELLED=${DEMO_LABELLED:-12}
FT_SIZE=${DEMO_FT_SIZE:-96}
FT_EPOCHS=${DEMO_FT_EPOCHS:-4}
FT_ITERS=${DEMO_FT_ITERS:-10}
UPPER=${DEMO_UPPER_STEPS:-0}
read -r -a PROBE_ARGS <<< "${DEMO_PROBE_ARGS:-}"
PY=${PYTHON:-python}
export OMP_NUM_THREADS=${DEMO_THREADS:-$(nproc 2>/dev/null || echo 2)}

step() { printf '\n=== [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }
start=$(date +%s)
mkdir -p "$OUT"
DL="$OUT/deeplesion"; HO="$OUT/heldout"; LAB="$OUT/labelled"

step "1/6 synthetic CT: $SERIES series for pre-training, $HELDOUT held out, $LABELLED labelled cases"
rm -rf "$DL" "$HO" "$LAB"
$PY "$here/synthetic_ct.py" "$DL" --kind deeplesion --n "$SERIES" --size "$SIZE" --n_slices 40 60 --seed 0
$PY "$here/synthetic_ct.py" "$HO" --kind deeplesion --n "$HELDOUT" --size "$SIZE" --n_slices 40 60 --seed 1000
$PY "$here/synthetic_ct.py" "$LAB" --kind labelled --n "$LABELLED" --size "$FT_SIZE" --n_slices 32 --seed 0

step "2/6 the three preprocessing scripts, run with their default folder names, in both sets"
for d in "$DL" "$HO"; do
  (cd "$d" && $PY "$here/DL_save_nifti.py" && $PY "$here/re_spacing_ITK.py" && $PY "$here/splitting_to_patches.py")
done
# one sub-volume per held-out volume (its first, so no two overlap)
grep '_dep0\.' "$HO/SSL_data_deeplesion.txt" > "$HO/retrieval.txt"
echo "pre-training: $(wc -l < "$DL/SSL_data_deeplesion.txt") sub-volumes; view retrieval: $(wc -l < "$HO/retrieval.txt") held out"

# the CPU settings are main_desd.py's preset cpu_demo (lr 0.03, teacher momentum 0.98,
# sharp teacher, BatchNorm in small heads, 16x48x48 crops); no local crops here
PRETRAIN=(--preset cpu_demo --arch "$ARCH" --epochs "$EPOCHS" --batch_size_per_gpu "$BATCH"
          --local_crops_number 0 --data_path "$DL" --list_path SSL_data_deeplesion.txt
          --retrieval_list "$HO/retrieval.txt" --print_freq 1000)
step "3/6 DeSD and DINO pre-training ($ARCH, $EPOCHS epochs, batch $BATCH, seeds ${PSEEDS[*]})"
for s in "${PSEEDS[@]}"; do
  for run in desd dino; do
    weights=(); [ "$run" = dino ] && weights=(--stage_weights 0 0 0 1)
    rm -rf "$OUT/${run}_s$s"
    $PY "$here/main_desd.py" "${PRETRAIN[@]}" ${weights[@]+"${weights[@]}"} --seed "$s" \
        --output_dir "$OUT/${run}_s$s" | grep -E "^(epoch [0-9]+:|WARNING|view retrieval|done)" | cut -c1-150
  done
done

CKPTS=(random); NAMES=(random)
for s in "${PSEEDS[@]}"; do CKPTS+=("$OUT/dino_s$s/checkpoint.pth"); NAMES+=(DINO); done
for s in "${PSEEDS[@]}"; do CKPTS+=("$OUT/desd_s$s/checkpoint.pth"); NAMES+=(DeSD); done
FT=(--arch "$ARCH" --data_dir "$LAB" --batch_size 2 --patch_size 32 64 64 --decoder_channels 128 64 32 16 8)
PROBED=("${CKPTS[@]}"); PROBED_NAMES=("${NAMES[@]}")
if [ "$UPPER" -gt 0 ]; then
  step "   the supervised upper bound: an encoder fine-tuned with labels for $UPPER steps"
  $PY "$here/finetune_example.py" "${FT[@]}" --epochs $(( (UPPER + 19) / 20 )) --iters_per_epoch 20 \
      --output_dir "$OUT/ft_upper" 2>/dev/null | grep -E "^Dice: " | sed "s/^/  supervised: /"
  PROBED+=("$OUT/ft_upper/finetuned_model.pth"); PROBED_NAMES+=(supervised)
fi
PROBE=(--arch "$ARCH" --data_dir "$LAB" --patches_per_case 16 --probe_seeds "${SEEDS[@]}"
       ${PROBE_ARGS[@]+"${PROBE_ARGS[@]}"})
step "4/6 frozen encoders per stage: view retrieval, linear probe, k-NN (seeds ${SEEDS[*]})"
quiet() { grep -vE "^(\[pre_|conv1.weight|  in the checkpoint|== )"; }  # the per-seed loading lines
$PY "$here/tools/eval_probe.py" "${PROBED[@]}" --names "${PROBED_NAMES[@]}" "${PROBE[@]}" \
    --retrieval_list "$HO/retrieval.txt" --output_dir "$OUT/probe" 2> "$OUT/probe.log" | quiet
step "   the same linear probe on patches through the pre-training's intensity augmentation"
$PY "$here/tools/eval_probe.py" "${PROBED[@]}" --names "${PROBED_NAMES[@]}" "${PROBE[@]}" --augment \
    --output_dir "$OUT/probe_augmented" 2> "$OUT/probe_augmented.log" | quiet

step "5/6 fine-tuning at equal steps ($FT_EPOCHS x $FT_ITERS) from scratch, DINO and DeSD, seeds ${SEEDS[*]}"
for s in "${SEEDS[@]}"; do
  for i in "${!CKPTS[@]}"; do
    name=${NAMES[$i]}; from=(); [ "$name" != random ] && from=(--pretrained "${CKPTS[$i]}")
    [ "$name" = random ] && name=scratch
    $PY "$here/finetune_example.py" "${FT[@]}" --epochs "$FT_EPOCHS" --iters_per_epoch "$FT_ITERS" \
        ${from[@]+"${from[@]}"} --seed "$s" \
        --output_dir "$OUT/ft/${name}_$i/seed$s" 2>/dev/null | grep -E "^Dice: " | sed "s/^/  $name, seed $s: /"
  done
done
$PY - "$OUT/ft" <<'EOF'
import json, sys, numpy as np
from pathlib import Path
groups = {}
for f in sorted(Path(sys.argv[1]).glob("*/seed*/results.json")):
    groups.setdefault(f.parts[-3].rsplit("_", 1)[0], []).append(json.loads(f.read_text())["dice"])
print("\nfine-tuning Dice on the held-out cases (mean ± std over seeds and pre-training runs)")
print("| from | Dice | runs |\n|---|---|---|")
for name, d in groups.items():
    print(f"| {name} | {np.mean(d):.3f} ± {np.std(d):.3f} | {len(d)} |")
EOF

step "6/6 training curves"
RUNS=(); LABELS=()
for s in "${PSEEDS[@]}"; do RUNS+=("$OUT/desd_s$s" "$OUT/dino_s$s"); LABELS+=("DeSD s$s" "DINO s$s"); done
$PY "$here/tools/plot_log.py" "${RUNS[@]}" --labels "${LABELS[@]}" --out "$OUT/curves.png" \
  || echo "(no curves: see the message above)"

step "done in $(( $(date +%s) - start )) s"
echo "the comparison: $OUT/probe/probe_results.{csv,json,png} (retrieval, clean probes),"
echo "  $OUT/probe_augmented (probes through the augmentation), $OUT/curves.png"
echo "pre-training runs: $OUT/{desd,dino}_s*/{checkpoint.pth,log.txt,teacher_backbone.safetensors}"
