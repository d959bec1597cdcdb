#!/usr/bin/env bash
# The project's GPU check: one command, one CUDA GPU, megatron-core installed, no Transformer Engine needed,
# no internet (nothing is installed or downloaded here). Target: under 6 minutes.
#
#   bash tools/gpu_check.sh [--out DIR] [--steps N] [--skip-throughput]
#
# 1. the CPU demo's tiny model (prepared locally) trained for N steps in bf16 and in fp32 at TP=1 (NCCL world
#    of 1, Hugging Face rollout engine on the GPU): fails unless train accuracy rises and every step's first
#    mini-batch is on-policy (|actor/on_policy_ppo_kl| small: the loaded weights are the ones trained);
# 2. bf16 resume: a run stopped at step N/2 and resumed must give the uninterrupted run's next-step metrics;
# 3. actor throughput (tokens/s, MFU, peak memory) of Qwen2.5-0.5B- and 1.5B-shaped random models, bf16,
#    16 samples of 1.3k-4.1k tokens, forward (old log-probs) and update;
# 4. Future-KL and FIPO-vs-DAPO loss timings on the GPU.
# Every figure is printed as a "GPU_CHECK {json}" line and collected in DIR/gpu_check.jsonl.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT=outputs/gpu_check
STEPS=12
THROUGHPUT=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --steps) STEPS="$2"; shift 2 ;;
    --skip-throughput) THROUGHPUT=0; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-python}"
TORCHRUN=("$PY" -m torch.distributed.run --nproc-per-node 1 --master-port "${MASTER_PORT:-29561}")
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONWARNINGS=ignore
export TOKENIZERS_PARALLELISM=false
"$PY" - <<'EOF'
import torch, sys
import os
if not torch.cuda.is_available() and not os.environ.get("FIPO_GPU_CHECK_ALLOW_CPU"):
    sys.exit("gpu_check.sh: no CUDA GPU visible (FIPO_GPU_CHECK_ALLOW_CPU=1 runs the script's logic on CPU)")
import megatron.core as mc
te = "present" if __import__("importlib").util.find_spec("transformer_engine") else "absent"
print(f"GPU {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none (CPU smoke run)'} | torch {torch.__version__} CUDA {torch.version.cuda} | "
      f"megatron-core {getattr(mc, '__version__', '?')} | Transformer Engine {te} | Python {sys.version.split()[0]}")
EOF
mkdir -p "$OUT"
LOG="$OUT/gpu_check.jsonl"
: > "$LOG"
T0=$(date +%s)
fail=0

echo "== demo model and data (local, CPU SFT)"
"$PY" examples/tiny-cpu/prepare.py --out "$OUT/prep"
if [[ ! -f "$OUT/prep/mcore_tp1/metadata.json" ]]; then
  "$PY" -m fipo_megatron.convert.cli hf-to-mcore --hf-dir "$OUT/prep/hf" --out "$OUT/prep/mcore_tp1" --tp 1 --pp 1
fi

train() {  # train DIR ITERS [extra flags...]
  local dir="$1" iters="$2"; shift 2
  "${TORCHRUN[@]}" -m fipo_megatron.train --config examples/tiny-cpu/config.yaml --tensor-model-parallel-size 1 \
    --hf-model-dir "$OUT/prep/hf" --train-data "$OUT/prep/data/train.jsonl" --eval-data "$OUT/prep/data/eval.jsonl" \
    --load "$OUT/prep/mcore_tp1" --save "$dir/checkpoints" --output-dir "$dir" --train-iters "$iters" \
    --eval-interval 0 --no-progress "$@" > "$dir.log" 2>&1 || { echo "training failed, see $dir.log" >&2; tail -20 "$dir.log" >&2; return 1; }
}
collect() {  # run a gpu_check.py step; its GPU_CHECK lines go to the log and the screen
  local tmp; tmp=$(mktemp)
  if ! "$@" > "$tmp" 2>&1; then fail=1; echo "step failed: $*" >&2; tail -20 "$tmp" >&2; fi
  grep '^GPU_CHECK ' "$tmp" | sed 's/^GPU_CHECK //' | tee -a "$LOG" || true
  rm -f "$tmp"
}

for dtype in bf16 fp32; do
  echo "== demo, $dtype, TP=1, $STEPS steps"
  dir="$OUT/demo_$dtype"; rm -rf "$dir" "$dir.log"; mkdir -p "$dir"
  flags=(); tol=1e-4
  if [[ $dtype == bf16 ]]; then flags=(--bf16); tol=2e-2; fi
  train "$dir" "$STEPS" "${flags[@]}" --save-interval $((STEPS / 2)) || fail=1
  collect "$PY" tools/gpu_check.py demo-verdict "$dir" --on-policy-tol "$tol"
done

echo "== bf16 resume"
half=$((STEPS / 2)); dir="$OUT/resume_bf16"; rm -rf "$dir" "$dir.log"; mkdir -p "$dir"
mkdir -p "$dir/checkpoints"
cp -r "$OUT/demo_bf16/checkpoints/iter_$(printf %07d "$half")" "$dir/checkpoints/"
echo "$half" > "$dir/checkpoints/latest_checkpointed_iteration.txt"
head -n "$half" "$OUT/demo_bf16/metrics.jsonl" > "$dir/metrics.jsonl"
train "$dir" $((half + 1)) --bf16 --save-interval "$half" || fail=1
collect "$PY" tools/gpu_check.py resume-verdict "$OUT/demo_bf16" "$dir" $((half + 1))

if [[ $THROUGHPUT == 1 ]]; then
  echo "== actor throughput, bf16, 4096-token sequences"
  collect "${TORCHRUN[@]}" tools/gpu_check.py throughput --out "$OUT/throughput"
  collect "${TORCHRUN[@]}" tools/gpu_check.py throughput --recompute --out "$OUT/throughput"
fi

echo "== Future-KL and loss kernels"
read -r -a KLENS <<< "${GPU_CHECK_KERNEL_LENGTHS:-2048 20480}"
collect "$PY" tools/gpu_check.py kernels --lengths "${KLENS[@]}"

echo "== done in $(( $(date +%s) - T0 )) s; figures in $LOG"
if grep -q '"ok": false' "$LOG"; then fail=1; fi
if [[ $fail -ne 0 ]]; then echo "GPU CHECK FAILED" >&2; exit 1; fi
echo "GPU CHECK PASSED"
