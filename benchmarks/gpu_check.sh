#!/usr/bin/env bash
# Everything issue 14 asks of a GPU machine, in one call, each step under its own time cap
# and the whole under BUDGET_S seconds; results under OUT (default: gpu_check_out/).
#
#   bash benchmarks/gpu_check.sh                  # on a GPU machine
#   SMOKE=1 bash benchmarks/gpu_check.sh          # every step tiny, on a CPU: checks the script
#
# Steps (each writes OUT/<step>.txt; OUT/gpu_check.log has the machine and a summary):
#   tests    the CUDA-only tests (tests/test_cuda.py and the device augmentation test)
#   e2e      sh run_ssl.sh on one GPU: res3d50, published crops, batch 32, bf16, workers = cores,
#            2 epochs x 10 iterations on synthetic sub-volumes; then a relaunch with --epochs 3
#            that must resume; checks log.txt, the checkpoint and teacher_backbone.safetensors
#   train    bench_train.py: the published step in fp32/tf32/bf16/fp16 x channels_last off/on,
#            with a profile of each (train.json: the rows)
#   epoch    bench_epoch.py: this trainer (bf16, device augmentation, workers = cores) on
#            npy, b2nd, nii.gz, nii; then the published configuration (fp32, CPU augmentation,
#            nii.gz, 10 workers) on the same GPU
#   compile  bench_train.py with --compile on (bf16, channels_last off/on)
#
# A bare machine lacks nibabel, isal and blosc2: put their wheels in .whl/ (see
# /work/.library/device/README.md); SimpleITK is not needed (the benchmarks write NIfTI
# with nibabel where it is missing).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-520} ))
NW=$(nproc)
export PYTHONUNBUFFERED=1
PY=python3
PATH="$($PY -c 'import os, sys; print(os.path.dirname(sys.executable))'):$PATH"  # torchrun

if [ "${SMOKE:-0}" = 1 ]; then   # tiny everything, CPU
    NW=2
    NET=(--arch res3d10 --out_dim 256 --batch 2)
    E2E_EXTRA=(--arch res3d10 --out_dim 256 --batch_size_per_gpu 2 --precision fp32)
    E2E_ITERS=2; FILES=4; SHAPE=(24 96 96); ITERS=(--warmup 1 --iters 2); PROF=1
    PRECISIONS=(fp32); GPU_TESTS=(tests/test_cuda.py)
else
    NET=()
    E2E_EXTRA=(--precision bf16)
    E2E_ITERS=10; FILES=32; SHAPE=(24 288 288); ITERS=(--warmup 5 --iters 20); PROF=3
    PRECISIONS=(fp32 tf32 bf16 fp16)
    GPU_TESTS=(tests/test_cuda.py "tests/test_data_loader.py::test_device_path_on_cuda_matches_cpu_statistics")
fi

if [ "${1:-}" = --e2e ]; then   # the e2e step, run by `step` below under its time cap
    set -e
    D=/tmp/desd_e2e
    rm -rf "$D"; mkdir -p "$D/DL_patches_v2"
    $PY - "$D" "$FILES" "${SHAPE[@]}" "$E2E_ITERS" <<'EOF'
import sys
sys.path.insert(0, "benchmarks")
import bench_epoch
d, files, shape, iters = sys.argv[1], int(sys.argv[2]), tuple(map(int, sys.argv[3:6])), int(sys.argv[6])
names = bench_epoch.write_volumes(f"{d}/DL_patches_v2", files, "npy", shape)
need = 3 * iters * 32
with open(f"{d}/list.txt", "w") as f:  # entries relative to the list file's folder
    f.write("".join(f"DL_patches_v2/{names[k % len(names)]}\n" for k in range(need)))
print(f"{files} sub-volumes of {shape}, list of {need} entries")
EOF
    run() {
        NPROC=1 DATA_PATH="$D" LIST_PATH=list.txt OUTPUT_DIR="$D/run" NUM_WORKERS=$NW \
            sh run_ssl.sh --warmup_epochs 0 --warmup_teacher_temp_epochs 0 \
            --max_iters_per_epoch "$E2E_ITERS" --print_freq 5 "${E2E_EXTRA[@]}" "$@"
    }
    t0=$(date +%s); run --epochs 2; echo "first launch: $(( $(date +%s) - t0 )) s"
    ls -la "$D/run"
    t0=$(date +%s); run --epochs 3 2>&1 | tee "$D/relaunch.txt"
    echo "relaunch: $(( $(date +%s) - t0 )) s"
    grep -q "resumed from .*checkpoint.pth at epoch 2" "$D/relaunch.txt"
    $PY - "$D/run" <<'EOF'
import json, math, sys
import torch
sys.path.insert(0, ".")
from models import build_backbone, load_pretrained_encoder
run = sys.argv[1]
rows = [json.loads(l) for l in open(f"{run}/log.txt")]
assert [r["epoch"] for r in rows] == [0, 1, 2], rows
assert all(math.isfinite(r["train_total_loss"]) for r in rows)
ck = torch.load(f"{run}/checkpoint.pth", map_location="cpu", weights_only=True)
assert ck["epoch"] == 3 and len(ck["log"]) == 3
arch = ck["args"]["arch"]
net = build_backbone(arch)
summary = load_pretrained_encoder(net, f"{run}/teacher_backbone.safetensors")
print("log.txt:", [(r["epoch"], round(r["train_total_loss"], 4), r["samples_per_s"]) for r in rows])
print(f"teacher_backbone.safetensors -> {arch}:", summary)
print("E2E OK")
EOF
    exit 0
fi

step() {   # step NAME CAP_SECONDS COMMAND...: output in OUT/NAME.txt, its tail on the console
    local name=$1 cap=$2 left rc t0
    shift 2
    left=$(( DEADLINE - $(date +%s) ))
    [ "$left" -lt "$cap" ] && cap=$left
    if [ "$cap" -lt 15 ]; then echo "== $name: skipped, no time left" | tee -a "$LOG"; return; fi
    echo "== $name (cap ${cap}s): $*" | tee -a "$LOG"
    t0=$(date +%s)
    timeout -k 10 "$cap" "$@" >> "$OUT/$name.txt" 2>&1
    rc=$?
    echo "== $name: exit $rc after $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
}

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
    $PY -c 'import torch, platform; print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version(), "Python", platform.python_version()); print(torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")'
    echo "cores: $(nproc); load: $(cat /proc/loadavg)"
} 2>&1 | tee -a "$LOG"

if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl 2>&1 | tail -3 | tee -a "$LOG"
    export PYTHONPATH=/tmp/site
fi

step tests 120 $PY -m pytest -q -p no:cacheprovider "${GPU_TESTS[@]}"
tail -3 "$OUT/tests.txt"
step e2e 180 bash "$0" --e2e
tail -4 "$OUT/e2e.txt"
step train 180 $PY benchmarks/bench_train.py "${NET[@]}" --precision "${PRECISIONS[@]}" \
    --channels_last off on "${ITERS[@]}" --profile "$PROF" --json "$OUT/train.json"
grep -B2 -A14 "^Training step" "$OUT/train.txt"

# this trainer's configuration: bf16 (fp32 on a CPU), the faster channels_last of the table
best_cl=$($PY - "$OUT/train.json" <<'EOF' 2>/dev/null || echo off
import json, sys
rows = [r for r in json.load(open(sys.argv[1]))["rows"] if r["compile"] == "off"]
bf16 = [r for r in rows if r["precision"] == "bf16"] or rows
print(min(bf16, key=lambda r: float(r["median_ms"]))["channels_last"])
EOF
)
if [ "${SMOKE:-0}" = 1 ]; then EPOCH_NET=(--arch res3d10 --out_dim 256 --batch 2 --precision fp32 --warmup 1 --iters 3)
else EPOCH_NET=(--precision bf16 --warmup 5 --iters 30); fi
step epoch 150 $PY benchmarks/bench_epoch.py --format npy b2nd nii.gz nii --num_workers "$NW" \
    --files "$FILES" --shape "${SHAPE[@]}" --channels_last "$best_cl" "${EPOCH_NET[@]}"
if [ "${SMOKE:-0}" = 1 ]; then PUB=(--arch res3d10 --out_dim 256 --batch 2 --warmup 1 --iters 3)
else PUB=(--warmup 5 --iters 30); fi
step epoch 90 $PY benchmarks/bench_epoch.py --format nii.gz --num_workers 10 --files "$FILES" \
    --shape "${SHAPE[@]}" --precision fp32 --augment_on cpu "${PUB[@]}"
grep -A12 "^Epoch throughput" "$OUT/epoch.txt"

step compile 200 $PY benchmarks/bench_train.py "${NET[@]}" --precision "${PRECISIONS[2]:-fp32}" \
    --channels_last off on --compile on "${ITERS[@]}"
grep -A8 "^Training step" "$OUT/compile.txt"
echo "== done, $(( DEADLINE - $(date +%s) )) s of the budget left" | tee -a "$LOG"
