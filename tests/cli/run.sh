#!/usr/bin/env bash
# The nats-CLI-equivalent tests: nats-py (installed by scripts/install-deps into .tools/py)
# against real bench-agent binaries on a real nats-server.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
cargo build --locked -p bench-agent -p bench-central >/dev/null
cd tests/cli
PYTHONPATH="$ROOT/.tools/py" python3 -m unittest -v test_nats_cli test_discovery 2>&1
