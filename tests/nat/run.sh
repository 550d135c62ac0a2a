#!/usr/bin/env bash
# The agent-behind-NAT test (root: network namespaces and iptables).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
cargo build --locked -p bench-agent -p bench-central >/dev/null
cd tests/nat
python3 -m unittest -v test_nat 2>&1
