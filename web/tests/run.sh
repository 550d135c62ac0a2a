#!/usr/bin/env bash
# web/tests/run.sh: the browser test against a real fleet.
#   Starts, on free ports in a throw-away directory: nats-server (JetStream), bench-central serving
#   web/, llama-server with the gemma-3-270m model, and two agents: one `engine: mock`, one on the
#   llama-server. Then runs web/tests/*.test.mjs (headless Debian Chromium via playwright-core) with
#   CENTRAL_URL pointing at that central, and stops everything it started.
#
#   web/tests/run.sh                 build (cargo), start, test, stop
#   SKIP_BUILD=1 web/tests/run.sh    use the existing target/debug binaries
#   KEEP_UP=1 web/tests/run.sh       leave the fleet running after the test (prints its URL;
#                                    stop it with kill <pids printed>)
# Logs: artifacts/ui-test/logs/. Screenshots: artifacts/screenshots/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
say() { printf '[ui-test] %s\n' "$*"; }
die() { printf '[ui-test] error: %s\n' "$*" >&2; exit 1; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/bench-race-ui.XXXXXX")"
LOGS="$ROOT/artifacts/ui-test/logs"
rm -rf "$LOGS"
mkdir -p "$LOGS"
PIDS=()

cleanup() {
  local rc=$?
  if [ "${KEEP_UP:-0}" = 1 ] && [ $rc -eq 0 ]; then
    say "left running: ${PIDS[*]} (central $CENTRAL_URL)"
    return
  fi
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do kill "${PIDS[i]}" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  rm -rf "$WORK"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'; }

# wait_for DESCRIPTION TIMEOUT_S COMMAND...: retries COMMAND until it succeeds, time runs out, or
# the process started last has exited.
wait_for() {
  local what=$1 timeout=$2; shift 2
  local deadline=$((SECONDS + timeout)) last=${PIDS[${#PIDS[@]}-1]}
  until "$@" >/dev/null 2>&1; do
    kill -0 "$last" 2>/dev/null || die "$what: the process exited (logs in $LOGS)"
    [ $SECONDS -lt $deadline ] || die "$what not ready after ${timeout}s (logs in $LOGS)"
    sleep 0.2
  done
  say "$what ready"
}

# --- binaries -------------------------------------------------------------------------------
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  say "cargo build -p bench-agent -p bench-central"
  cargo build -q -p bench-agent -p bench-central
fi
AGENT_BIN="$ROOT/target/debug/bench-agent"
CENTRAL_BIN="$ROOT/target/debug/bench-central"
[ -x "$AGENT_BIN" ] && [ -x "$CENTRAL_BIN" ] || die "missing $AGENT_BIN or $CENTRAL_BIN"
NATS_BIN="$(scripts/nats bin)"
LLAMA_BIN="$(scripts/engine bin)"
MODEL="$(scripts/engine model-path)"
if [ ! -x "$LLAMA_BIN" ] || [ ! -f "$MODEL" ]; then scripts/engine install; fi
command -v node >/dev/null || die "node is required"
[ -x "${CHROMIUM:-/usr/bin/chromium}" ] || die "chromium not found (apt-get install chromium)"
if [ ! -d web/node_modules/playwright-core ]; then
  say "npm ci (playwright-core; no browser download)"
  (cd web && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund)
fi

NATS_PORT=$(free_port)
CENTRAL_PORT=$(free_port)
ENGINE_PORT=$(free_port)
export NATS_URL="nats://127.0.0.1:$NATS_PORT"
CENTRAL_URL="http://127.0.0.1:$CENTRAL_PORT"
MODEL_NAME="gemma-3-270m"

# --- nats-server ----------------------------------------------------------------------------
"$NATS_BIN" -js -a 127.0.0.1 -p "$NATS_PORT" -sd "$WORK/nats" >"$LOGS/nats.log" 2>&1 &
PIDS+=($!)
wait_for "nats-server on :$NATS_PORT" 20 bash -c "exec 3<>/dev/tcp/127.0.0.1/$NATS_PORT"

# --- llama-server -------------------------------------------------------------------------------
# One core is left to Chromium, central and the agents: llama.cpp's threads slow down badly when
# the machine is oversubscribed, which would turn the race into a measurement of the test itself.
LLAMA_THREADS=${LLAMA_THREADS:-$(( $(nproc) > 1 ? $(nproc) - 1 : 1 ))}
"$LLAMA_BIN" -m "$MODEL" --alias "$MODEL_NAME" --host 127.0.0.1 --port "$ENGINE_PORT" \
  --no-jinja --chat-template gemma -c 4096 -t "$LLAMA_THREADS" --no-ui >"$LOGS/llama-server.log" 2>&1 &
PIDS+=($!)
wait_for "llama-server on :$ENGINE_PORT" 120 curl -fsS "http://127.0.0.1:$ENGINE_PORT/health"

# --- central ------------------------------------------------------------------------------------
CENTRAL_HOST=127.0.0.1 CENTRAL_PORT=$CENTRAL_PORT CENTRAL_RESULTS_DIR="$WORK/results" CENTRAL_WEB_DIR="$ROOT/web" \
  "$CENTRAL_BIN" >"$LOGS/central.log" 2>&1 &
PIDS+=($!)
wait_for "bench-central on :$CENTRAL_PORT" 60 bash -c "curl -fsS '$CENTRAL_URL/health' | grep -q '\"connected\"'"

# --- two agents ---------------------------------------------------------------------------------
cat >"$WORK/agent-mock.yaml" <<EOF
machine_id: "ui-mock"
label: "Mock engine (synthetic, 120 tok/s)"
engine: mock
mock: {tokens_per_s: 120, ttft_ms: 30}
llm_models: ["$MODEL_NAME"]
bind_host: "127.0.0.1"
bind_port: 0
heartbeat_s: 2
nats: {url: "$NATS_URL"}
EOF
cat >"$WORK/agent-llama.yaml" <<EOF
machine_id: "ui-llama"
label: "llama.cpp · gemma-3-270m Q4_K_M"
engine: openai
openai_base_url: "http://127.0.0.1:$ENGINE_PORT"
llm_models: ["$MODEL_NAME"]
bind_host: "127.0.0.1"
bind_port: 0
heartbeat_s: 2
nats: {url: "$NATS_URL"}
EOF
for a in mock llama; do
  "$AGENT_BIN" --config "$WORK/agent-$a.yaml" >"$LOGS/agent-$a.log" 2>&1 &
  PIDS+=($!)
done
two_online() {
  curl -fsS "$CENTRAL_URL/api/machines" | python3 -c '
import json, sys
ms = json.load(sys.stdin)["machines"]
up = [m for m in ms if m["status"] != "offline" and "'"$MODEL_NAME"'" in (m.get("models") or [])]
sys.exit(0 if len(up) >= 2 else 1)'
}
wait_for "two agents registered with $MODEL_NAME" 60 two_online

# --- the test -----------------------------------------------------------------------------------
say "central at $CENTRAL_URL; running the browser test"
cd web
CENTRAL_URL="$CENTRAL_URL" TEST_MODEL="$MODEL_NAME" node --test --test-concurrency=1 tests/*.test.mjs
