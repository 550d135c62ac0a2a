#!/usr/bin/env bash
# The behind-NAT tests (root: network namespaces and iptables): an agent dialling the hub
# directly (test_nat), and a site's leaf node server, direct and through an HTTP proxy (test_leaf).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
cargo build --locked -p bench-agent -p bench-central >/dev/null
cd tests/nat
python3 -m unittest -v test_nat test_leaf 2>&1
