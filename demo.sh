#!/usr/bin/env bash
# The whole DeSD pipeline on a laptop CPU, on synthetic CT, in a few minutes:
#   synthetic DeepLesion-format data -> PNG to NIfTI -> 1 mm -> 24-slice sub-volumes
#   -> short DeSD pre-training (and the DINO baseline: --stage_weights 0 0 0 1)
#   -> fine-tuning from the DeSD teacher and from scratch -> Dice of both
#   -> frozen-encoder probes per stage (random vs DINO vs DeSD) -> loss curves PNG.
#
#   bash demo.sh
#
# The synthetic set shows the mechanism working, not the paper's numbers.
# Environment variables (defaults in brackets):
#   DEMO_OUT        where everything goes                         [<repo>/demo_output]
#   DEMO_SERIES     synthetic CT series for pre-training          [8]
#   DEMO_SIZE       in-plane pixels of the synthetic CT           [128]
#   DEMO_EPOCHS     pre-training epochs                           [4]
#   DEMO_ARCH       backbone                                      [res3d10]
#   DEMO_FT_EPOCHS  fine-tuning epochs                            [3]
#   DEMO_FT_ITERS   fine-tuning iterations per epoch              [8]
#   DEMO_PROBE      1 runs the probes (random / DINO / DeSD)      [1]
#   DEMO_PROBE_ARGS extra arguments for eval_probe.py             []
#   DEMO_FT_SIZE    in-plane size of the fine-tuning phantoms     [64]
#   DEMO_THREADS    CPU threads for PyTorch                       [all cores]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
OUT=${DEMO_OUT:-$here/demo_output}
SERIES=${DEMO_SERIES:-8}
SIZE=${DEMO_SIZE:-128}
EPOCHS=${DEMO_EPOCHS:-4}
ARCH=${DEMO_ARCH:-res3d10}
FT_EPOCHS=${DEMO_FT_EPOCHS:-3}
FT_ITERS=${DEMO_FT_ITERS:-8}
PROBE=${DEMO_PROBE:-1}
FT_SIZE=${DEMO_FT_SIZE:-64}
read -r -a PROBE_ARGS <<< "${DEMO_PROBE_ARGS:-}"
PY=${PYTHON:-python}
export OMP_NUM_THREADS=${DEMO_THREADS:-$(nproc 2>/dev/null || echo 2)}

step() { printf '\n=== [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }
start=$(date +%s)
mkdir -p "$OUT"
DL="$OUT/deeplesion"

step "1/7 synthetic DeepLesion-format CT ($SERIES series, ${SIZE}x${SIZE}) -> $DL"
rm -rf "$DL"
$PY "$here/synthetic_ct.py" "$DL" --kind deeplesion --n "$SERIES" --size "$SIZE" --n_slices 40 60

step "2/7 the three preprocessing scripts, run with their default folder names inside $DL"
(
  cd "$DL"
  $PY "$here/DL_save_nifti.py"
  $PY "$here/re_spacing_ITK.py"
  $PY "$here/splitting_to_patches.py"
)
echo "sub-volumes: $(wc -l < "$DL/SSL_data_deeplesion.txt") listed in $DL/SSL_data_deeplesion.txt"

PRETRAIN=(--arch "$ARCH" --data_path "$DL" --list_path SSL_data_deeplesion.txt
          --epochs "$EPOCHS" --warmup_epochs 1 --batch_size_per_gpu 4 --num_workers 1
          --out_dim 1024 --head_hidden_dim 256 --head_bottleneck_dim 64
          --global_crop_size 16 48 48 --local_crop_size 16 48 48 --local_crops_number 0
          --lr 0.02 --momentum_teacher 0.95 --teacher_temp 0.04 --print_freq 5)

step "3/7 DeSD pre-training ($ARCH, $EPOCHS epochs, CPU) -> $OUT/desd"
rm -rf "$OUT/desd"
$PY "$here/main_desd.py" "${PRETRAIN[@]}" --output_dir "$OUT/desd"

step "4/7 the DINO baseline: the same run with --stage_weights 0 0 0 1 -> $OUT/dino"
rm -rf "$OUT/dino"
$PY "$here/main_desd.py" "${PRETRAIN[@]}" --stage_weights 0 0 0 1 --output_dir "$OUT/dino"

FT=(--arch "$ARCH" --epochs "$FT_EPOCHS" --iters_per_epoch "$FT_ITERS" --batch_size 2
    --patch_size 32 64 64 --decoder_channels 128 64 32 16 8 --n_synthetic 6
    --synthetic_size "$FT_SIZE" --synthetic_slices 40)

step "5/7 fine-tuning from the DeSD teacher -> $OUT/ft_desd"
$PY "$here/finetune_example.py" "${FT[@]}" --pretrained "$OUT/desd/checkpoint.pth" \
    --output_dir "$OUT/ft_desd" | tee "$OUT/ft_desd.txt"

step "6/7 fine-tuning from scratch -> $OUT/ft_scratch"
$PY "$here/finetune_example.py" "${FT[@]}" --output_dir "$OUT/ft_scratch" | tee "$OUT/ft_scratch.txt"

if [ "$PROBE" = "1" ]; then
  step "7/7 frozen-encoder probes per stage (random / DINO / DeSD) and loss curves"
  $PY "$here/tools/eval_probe.py" random "$OUT/dino/checkpoint.pth" "$OUT/desd/checkpoint.pth" \
      --names random DINO DeSD --arch "$ARCH" --output_dir "$OUT/probe" ${PROBE_ARGS[@]+"${PROBE_ARGS[@]}"}
  $PY "$here/tools/plot_log.py" "$OUT/desd" "$OUT/dino" --labels DeSD DINO --out "$OUT/curves.png" \
    || echo "(tools/plot_log.py needs matplotlib: pip install matplotlib)"
fi

dice() { grep -E '^Dice: ' "$1" | tail -n 1; }
step "done in $(( $(date +%s) - start )) s"
echo "fine-tuning from the DeSD teacher: $(dice "$OUT/ft_desd.txt")"
echo "fine-tuning from scratch:          $(dice "$OUT/ft_scratch.txt")"
echo "outputs:"
echo "  preprocessed data      $DL/{Images_nifti,Images_nifti_spacing,DL_patches_v2}"
echo "  DeSD run               $OUT/desd/{checkpoint.pth,log.txt,teacher_backbone.safetensors}"
echo "  DINO baseline          $OUT/dino"
echo "  fine-tuning            $OUT/ft_desd, $OUT/ft_scratch (results.json)"
[ "$PROBE" = "1" ] && echo "  probes and curves      $OUT/probe/probe_results.{csv,json,png}, $OUT/curves.png"
exit 0
