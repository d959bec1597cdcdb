# shellcheck shell=bash
# shellcheck disable=SC2153  # the upper-case settings are assigned by the recipe that sources this
# Shared machinery of the SLURM recipes (sourced by examples/*/fipo.sbatch and dapo.sbatch).
#
# The recipe script sets every path, node count, parallel size and hyperparameter as a variable,
# then calls `recipe_main "$@"`. This file only turns those variables into commands:
#   - node split: the first ROLLOUT_NODES hosts of the allocation run rollout servers
#     (GPUS_PER_NODE / ROLLOUT_TP servers per node, ports ROLLOUT_BASE_PORT, +1, ...), the other
#     NODES - ROLLOUT_NODES hosts run `torchrun -m fipo_megatron.train` (one srun task per node);
#   - the planner `python -m fipo_megatron.plan` validates the training layout and prints the
#     per-GPU memory estimate (always, before anything starts);
#   - `--dry-run` (first argument) prints the exact commands and the plan, with SLURM variables
#     defaulted when unset, and starts nothing.
# The trainer gets every server URL (--rollout-urls) and balances requests itself; no
# sglang-router is put in front because NCCL weight sync must reach each server directly.

# Print a command as one line that a shell can run (arguments quoted only where needed).
recipe_print_cmd() {
    local out="" arg
    for arg in "$@"; do
        if [[ "$arg" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
            out+="$arg "
        else
            out+="$(printf '%q' "$arg") "
        fi
    done
    printf '%s\n' "${out% }"
}

# Stop the rollout server steps this script started (EXIT trap of a real run).
RECIPE_SERVER_PIDS=()
recipe_cleanup() {
    local pid
    for pid in "${RECIPE_SERVER_PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
}

# Fill RECIPE_HOSTS (array) from the SLURM allocation, or with placeholders for a dry run.
recipe_hosts() {
    RECIPE_HOSTS=()
    if [[ -n "${SLURM_JOB_NODELIST:-}" ]] && command -v scontrol >/dev/null 2>&1; then
        mapfile -t RECIPE_HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    else
        local i
        for ((i = 1; i <= NODES; i++)); do
            RECIPE_HOSTS+=("$(printf 'node%03d' "$i")")
        done
    fi
    if ((${#RECIPE_HOSTS[@]} != NODES)); then
        echo "error: NODES=$NODES but the allocation has ${#RECIPE_HOSTS[@]} hosts" \
             "(#SBATCH --nodes must equal NODES)" >&2
        return 1
    fi
}

# Check the node split and the rollout server shape; fill ROLLOUT_HOSTS, TRAIN_HOSTS.
recipe_check_split() {
    if ((ROLLOUT_NODES < 1 || ROLLOUT_NODES >= NODES)); then
        echo "error: ROLLOUT_NODES=$ROLLOUT_NODES must be >= 1 and < NODES=$NODES" \
             "(training needs at least one node)" >&2
        return 1
    fi
    if ((GPUS_PER_NODE % ROLLOUT_TP != 0)); then
        echo "error: ROLLOUT_TP=$ROLLOUT_TP must divide GPUS_PER_NODE=$GPUS_PER_NODE" >&2
        return 1
    fi
    case "$ROLLOUT_ENGINE" in
        sglang | vllm) ;;
        *) echo "error: ROLLOUT_ENGINE=$ROLLOUT_ENGINE must be sglang or vllm" >&2; return 1 ;;
    esac
    TRAIN_NODES=$((NODES - ROLLOUT_NODES))
    ROLLOUT_HOSTS=("${RECIPE_HOSTS[@]:0:ROLLOUT_NODES}")
    TRAIN_HOSTS=("${RECIPE_HOSTS[@]:ROLLOUT_NODES}")
    SERVERS_PER_NODE=$((GPUS_PER_NODE / ROLLOUT_TP))
}

# Fill SERVER_CMD (array) for server number $1 (0-based on its node) listening on port $2.
recipe_server_cmd() {
    local idx=$1 port=$2 first gpus="" g
    first=$((idx * ROLLOUT_TP))
    for ((g = first; g < first + ROLLOUT_TP; g++)); do
        gpus+="${gpus:+,}$g"
    done
    local ctx=$((MAX_PROMPT_LENGTH + MAX_RESPONSE_LENGTH))
    if [[ "$ROLLOUT_ENGINE" == sglang ]]; then
        # SGLANG_RETURN_ORIGINAL_LOGPROB=1: report log-probs of the unscaled model distribution (what
        # Megatron recomputes), not of the temperature-scaled one.
        SERVER_CMD=(env "CUDA_VISIBLE_DEVICES=$gpus" SGLANG_RETURN_ORIGINAL_LOGPROB=1 "$PYTHON" -m sglang.launch_server
            --model-path "$HF_MODEL_DIR" --tp "$ROLLOUT_TP" --host 0.0.0.0 --port "$port"
            --context-length "$ctx" --mem-fraction-static "$ROLLOUT_GPU_MEMORY_FRACTION"
            --random-seed "$SEED" "${SGLANG_EXTRA_ARGS[@]}")
    else
        # VLLM_SERVER_DEV_MODE=1: the weight-update endpoints (/pause, /resume, /collective_rpc,
        # /init_weight_transfer_engine, ...) exist only in dev mode; --weight-transfer-config sets up
        # the NCCL receiver for --weight-sync nccl (without it /init_weight_transfer_engine is a 404).
        local transfer=()
        if [[ "$WEIGHT_SYNC" == nccl ]]; then
            transfer=(--weight-transfer-config '{"backend":"nccl"}')
        fi
        SERVER_CMD=(env "CUDA_VISIBLE_DEVICES=$gpus" VLLM_SERVER_DEV_MODE=1 vllm serve "$HF_MODEL_DIR"
            --tensor-parallel-size "$ROLLOUT_TP" --host 0.0.0.0 --port "$port"
            --max-model-len "$ctx" --gpu-memory-utilization "$ROLLOUT_GPU_MEMORY_FRACTION"
            --seed "$SEED" "${transfer[@]}" "${VLLM_EXTRA_ARGS[@]}")
    fi
}

# Fill NODE_SCRIPT: the bash script one srun step runs on rollout host $1 (all its servers, each
# on its own GPUs via CUDA_VISIBLE_DEVICES, logs in LOG_DIR), waiting for them.
recipe_node_script() {
    local host=$1 i
    NODE_SCRIPT=""
    for ((i = 0; i < SERVERS_PER_NODE; i++)); do
        recipe_server_cmd "$i" "$((ROLLOUT_BASE_PORT + i))"
        NODE_SCRIPT+="$(recipe_print_cmd "${SERVER_CMD[@]}") >$(printf '%q' "$LOG_DIR/rollout-$host-$i.log") 2>&1 & "
    done
    NODE_SCRIPT+="wait"
}

# Fill ROLLOUT_URLS (comma-separated) from the rollout hosts and ports.
recipe_rollout_urls() {
    local host i urls=""
    for host in "${ROLLOUT_HOSTS[@]}"; do
        for ((i = 0; i < SERVERS_PER_NODE; i++)); do
            urls+="${urls:+,}http://$host:$((ROLLOUT_BASE_PORT + i))"
        done
    done
    ROLLOUT_URLS=$urls
}

# --load: the run's own SAVE_DIR once it holds a checkpoint (the latest_checkpointed_iteration.txt
# pointer the trainer writes), else INIT_LOAD (the base model converted with fipo-convert). Resubmitting resumes.
recipe_load_dir() {
    if [[ -e "$SAVE_DIR/latest_checkpointed_iteration.txt" ]]; then
        LOAD_DIR=$SAVE_DIR
    else
        LOAD_DIR=$INIT_LOAD
    fi
}

# Fill TRAIN_ARGS (array): the trainer's Megatron-style arguments.
recipe_train_args() {
    TRAIN_ARGS=(
        --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
        --context-parallel-size "$CP" --use-distributed-optimizer --bf16
        --global-batch-size "$GLOBAL_BATCH_SIZE" --mini-batch-size "$MINI_BATCH_SIZE"
        --n-samples-per-prompt "$N_SAMPLES_PER_PROMPT"
        --max-tokens-per-micro-batch "$MAX_TOKENS_PER_MICRO_BATCH"
        --lr "$LR" --lr-warmup-iters "$LR_WARMUP_ITERS" --weight-decay "$WEIGHT_DECAY"
        --clip-grad "$CLIP_GRAD" --adam-beta1 "$ADAM_BETA1" --adam-beta2 "$ADAM_BETA2"
        --seed "$SEED" --train-iters "$TRAIN_ITERS"
        --load "$LOAD_DIR" --save "$SAVE_DIR" --save-interval "$SAVE_INTERVAL"
        --hf-model-dir "$HF_MODEL_DIR" --train-data "$TRAIN_DATA" --eval-data "$EVAL_DATA"
        --eval-interval "$EVAL_INTERVAL" --eval-samples-per-prompt "$EVAL_SAMPLES_PER_PROMPT"
        --eval-temperature "$EVAL_TEMPERATURE" --eval-top-p "$EVAL_TOP_P"
        --max-prompt-length "$MAX_PROMPT_LENGTH" --max-response-length "$MAX_RESPONSE_LENGTH"
        --overlong-buffer "$OVERLONG_BUFFER" --overlong-penalty-factor "$OVERLONG_PENALTY_FACTOR"
        --temperature "$TEMPERATURE" --top-p "$TOP_P"
        --algorithm "$ALGORITHM"
        --clip-ratio-low "$CLIP_RATIO_LOW" --clip-ratio-high "$CLIP_RATIO_HIGH"
        --clip-ratio-c "$CLIP_RATIO_C"
    )
    if [[ "$ALGORITHM" == fipo ]]; then
        TRAIN_ARGS+=(--future-kl-decay-rate "$FUTURE_KL_DECAY_RATE"
            --future-kl-clip-ratio "$FUTURE_KL_CLIP_RATIO")
        if [[ "$FUTURE_KL_CLIP_HIGH_ONLY" == 1 ]]; then
            TRAIN_ARGS+=(--future-kl-clip-high-only)
        else
            TRAIN_ARGS+=(--no-future-kl-clip-high-only)
        fi
        TRAIN_ARGS+=(--safety-threshold "$SAFETY_THRESHOLD")
    fi
    if [[ "$DYNAMIC_SAMPLING" == 1 ]]; then
        TRAIN_ARGS+=(--dynamic-sampling --max-num-gen-batches "$MAX_NUM_GEN_BATCHES"
            --gen-batch-size "$GEN_BATCH_SIZE")
    fi
    TRAIN_ARGS+=(--rollout-engine "$ROLLOUT_ENGINE" --rollout-urls "$ROLLOUT_URLS"
        --rollout-gpus-per-server "$ROLLOUT_TP"
        --weight-sync "$WEIGHT_SYNC" --weight-sync-bucket-mb "$WEIGHT_SYNC_BUCKET_MB"
        --output-dir "$OUTPUT_DIR")
    recipe_recompute_args
    TRAIN_ARGS+=("${RECOMPUTE_TRAIN_ARGS[@]}")
}

# Check RECOMPUTE (none | selective | full, Megatron-LM's meanings) and fill RECOMPUTE_TRAIN_ARGS and
# RECOMPUTE_PLAN_ARGS (arrays): selective = --recompute-granularity selective (what Megatron-LM's
# --recompute-activations means: core attention only); full = --recompute-granularity full with
# RECOMPUTE_METHOD and RECOMPUTE_NUM_LAYERS (whole layers; only their inputs are kept).
recipe_recompute_args() {
    RECOMPUTE_TRAIN_ARGS=()
    RECOMPUTE_PLAN_ARGS=(--recompute "$RECOMPUTE")
    case "$RECOMPUTE" in
        none) ;;
        selective) RECOMPUTE_TRAIN_ARGS=(--recompute-granularity selective) ;;
        full)
            RECOMPUTE_TRAIN_ARGS=(--recompute-granularity full --recompute-method "$RECOMPUTE_METHOD"
                --recompute-num-layers "$RECOMPUTE_NUM_LAYERS")
            RECOMPUTE_PLAN_ARGS+=(--recompute-method "$RECOMPUTE_METHOD"
                --recompute-num-layers "$RECOMPUTE_NUM_LAYERS")
            ;;
        *)
            echo "error: RECOMPUTE=$RECOMPUTE must be none, selective or full (the old RECOMPUTE=1 is" \
                 "full, with RECOMPUTE_METHOD=uniform RECOMPUTE_NUM_LAYERS=1)" >&2
            return 1
            ;;
    esac
}

# Fill TORCHRUN_CMD (array): what each training node runs (one srun task per node).
recipe_torchrun_cmd() {
    TORCHRUN_CMD=(torchrun --nnodes "$TRAIN_NODES" --nproc-per-node "$GPUS_PER_NODE"
        --rdzv-backend c10d --rdzv-endpoint "${TRAIN_HOSTS[0]}:$MASTER_PORT"
        --rdzv-id "${SLURM_JOB_ID:-dryrun}" -m fipo_megatron.train "${TRAIN_ARGS[@]}")
}

# Fill PLAN_CMD (array): the planner for the training nodes' layout.
recipe_plan_cmd() {
    PLAN_CMD=("$PYTHON" -m fipo_megatron.plan)
    if [[ -f "$HF_MODEL_DIR/config.json" ]]; then
        PLAN_CMD+=(--hf-config "$HF_MODEL_DIR/config.json")
    else
        # No model on this machine (dry run): use the preset shape.
        PLAN_CMD+=(--model "$PLAN_MODEL_PRESET")
        if [[ -n "${PLAN_MAX_POSITION_EMBEDDINGS:-}" ]]; then
            PLAN_CMD+=(--max-position-embeddings "$PLAN_MAX_POSITION_EMBEDDINGS")
        fi
    fi
    recipe_recompute_args
    PLAN_CMD+=(--nodes "$TRAIN_NODES" --gpus-per-node "$GPUS_PER_NODE"
        --tp "$TP" --pp "$PP" --cp "$CP"
        --max-tokens-per-micro-batch "$MAX_TOKENS_PER_MICRO_BATCH"
        --max-prompt-length "$MAX_PROMPT_LENGTH" --max-response-length "$MAX_RESPONSE_LENGTH"
        --global-batch-size "$GLOBAL_BATCH_SIZE" --mini-batch-size "$MINI_BATCH_SIZE"
        --n-samples-per-prompt "$N_SAMPLES_PER_PROMPT" "${RECOMPUTE_PLAN_ARGS[@]}"
        --gpu-memory-gib "$GPU_MEMORY_GIB" --avg-response-tokens "$PLAN_AVG_RESPONSE_TOKENS")
    if [[ -n "${PLAN_JSON_OUT:-}" ]]; then
        PLAN_CMD+=(--json-out "$PLAN_JSON_OUT")
    fi
}

# Block until every rollout server answers /health, or fail naming the ones that did not.
recipe_wait_for_servers() {
    local deadline=$((SECONDS + SERVER_START_TIMEOUT)) url pending
    IFS=, read -r -a pending <<<"$ROLLOUT_URLS"
    while ((${#pending[@]} > 0)); do
        local still=()
        for url in "${pending[@]}"; do
            curl -sf -o /dev/null "$url/health" || still+=("$url")
        done
        pending=("${still[@]}")
        ((${#pending[@]} == 0)) && break
        if ((SECONDS > deadline)); then
            echo "error: rollout servers not healthy after ${SERVER_START_TIMEOUT}s:" \
                 "${pending[*]} (logs in $LOG_DIR)" >&2
            return 1
        fi
        sleep 10
    done
}

recipe_main() {
    local dry_run=0
    if [[ "${1:-}" == --dry-run ]]; then
        dry_run=1
        shift
    fi
    if (($# > 0)); then
        echo "error: unknown arguments: $* (only --dry-run is accepted; edit the variables)" >&2
        return 2
    fi
    if ((dry_run == 0)) && [[ -z "${SLURM_JOB_ID:-}" ]]; then
        echo "error: not inside a SLURM job: submit with sbatch, or pass --dry-run" >&2
        return 2
    fi
    recipe_hosts
    recipe_check_split
    recipe_rollout_urls
    recipe_load_dir
    recipe_train_args
    recipe_torchrun_cmd
    recipe_plan_cmd
    local node_srun=(srun --nodes=1 --ntasks=1 --overlap)
    local train_list
    train_list=$(IFS=,; echo "${TRAIN_HOSTS[*]}")
    local train_srun=(srun "--nodes=$TRAIN_NODES" --ntasks-per-node=1 "--nodelist=$train_list"
        --kill-on-bad-exit=1)

    echo "== $RUN_NAME: $NODES nodes = $ROLLOUT_NODES rollout ($ROLLOUT_ENGINE," \
         "$SERVERS_PER_NODE x TP=$ROLLOUT_TP servers per node) + $TRAIN_NODES training"
    echo "== environment on every node"
    echo "export CUDA_DEVICE_MAX_CONNECTIONS=1 PYTHONUNBUFFERED=1"
    echo "== rollout servers: one step per rollout host," \
         "$(recipe_print_cmd "${node_srun[@]}") --nodelist=<host> bash -c '<the host's lines> & wait'"
    echo "   (log: $LOG_DIR/rollout-<host>-<i>.log)"
    local host i
    for host in "${ROLLOUT_HOSTS[@]}"; do
        for ((i = 0; i < SERVERS_PER_NODE; i++)); do
            recipe_server_cmd "$i" "$((ROLLOUT_BASE_PORT + i))"
            printf '[%s] ' "$host"
            recipe_print_cmd "${SERVER_CMD[@]}"
        done
    done
    echo "== trainer, on each of ${TRAIN_HOSTS[*]} (log: $LOG_DIR/train.log)"
    recipe_print_cmd "${train_srun[@]}" "${TORCHRUN_CMD[@]}"
    echo "== layout and memory plan"
    recipe_print_cmd "${PLAN_CMD[@]}"
    local rc=0
    (cd "$REPO_DIR" && "${PLAN_CMD[@]}") || rc=$?
    if ((rc != 0)); then
        echo "error: the planner rejected this layout (exit $rc); fix TP/PP/CP/NODES above" >&2
        return "$rc"
    fi
    if ((dry_run == 1)); then
        echo "== dry run: nothing started"
        return 0
    fi

    mkdir -p "$LOG_DIR" "$SAVE_DIR" "$OUTPUT_DIR"
    export CUDA_DEVICE_MAX_CONNECTIONS=1 PYTHONUNBUFFERED=1
    trap recipe_cleanup EXIT
    for host in "${ROLLOUT_HOSTS[@]}"; do
        recipe_node_script "$host"
        "${node_srun[@]}" "--nodelist=$host" bash -c "$NODE_SCRIPT" &
        RECIPE_SERVER_PIDS+=("$!")
    done
    recipe_wait_for_servers
    (cd "$REPO_DIR" && "${train_srun[@]}" "${TORCHRUN_CMD[@]}") 2>&1 | tee -a "$LOG_DIR/train.log"
}
