#!/usr/bin/env sh
# The published DeSD pre-training run (docs/method.md §7) through torchrun.
#
#   sh run_ssl.sh                                  # 6 GPUs on this machine, published settings
#   NPROC=1 sh run_ssl.sh                          # one GPU (same per-GPU batch; lr scales with it)
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 sh run_ssl.sh   # on each node, NODE_RANK 0..NNODES-1
#   sh run_ssl.sh --use_fp16 True --epochs 10      # extra arguments pass through to main_desd.py
#
# Environment variables (defaults in brackets):
#   DATA_PATH   data root holding the list file and DL_patches_v2/   [.]
#   LIST_PATH   list file, relative to DATA_PATH                      [SSL_data_deeplesion.txt]
#   OUTPUT_DIR  checkpoints and log.txt; relaunching resumes from it  [runs/desd_res50]
#   NPROC       processes (GPUs) per node                             [6]
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   multi-node rendezvous [1, 0, 127.0.0.1, 29500]
#   NUM_WORKERS DataLoader workers per GPU                            [10]
#
# Speed (README "Speed", measured on one H100 with benchmarks/gpu_check.sh): the published
# arithmetic (fp32, no autocast) is kept here. Measured per batch-32 step: 113.6 ms with
# PyTorch's own instance norm, 84.8 ms with the group-norm route models/ now takes
# automatically (same function); --channels_last True made it slower (114 -> 144 ms).
# Faster, but not the published arithmetic: --precision bf16 --compile True (51.4 ms;
# minutes of compilation at start-up).
set -eu
: "${DATA_PATH:=.}"
: "${LIST_PATH:=SSL_data_deeplesion.txt}"
: "${OUTPUT_DIR:=runs/desd_res50}"
: "${NPROC:=6}"
: "${NNODES:=1}"
: "${NODE_RANK:=0}"
: "${MASTER_ADDR:=127.0.0.1}"
: "${MASTER_PORT:=29500}"
: "${NUM_WORKERS:=10}"
here=$(cd "$(dirname "$0")" && pwd)
exec torchrun --nproc_per_node="$NPROC" --nnodes="$NNODES" --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
    "$here/main_desd.py" \
    --arch res3d50 \
    --data_path "$DATA_PATH" \
    --list_path "$LIST_PATH" \
    --output_dir "$OUTPUT_DIR" \
    --batch_size_per_gpu 32 \
    --optimizer sgd \
    --use_fp16 False \
    --momentum_teacher 0.996 \
    --epochs 300 \
    --out_dim 60000 \
    --warmup_teacher_temp 0.04 \
    --teacher_temp 0.07 \
    --warmup_teacher_temp_epochs 20 \
    --weight_decay 1e-6 \
    --weight_decay_end 1e-6 \
    --clip_grad 0 \
    --lr 0.3 \
    --min_lr 0.048 \
    --use_bn_in_head True \
    --num_workers "$NUM_WORKERS" \
    "$@"
