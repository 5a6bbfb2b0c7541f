#!/usr/bin/env bash
# Rebuilds tests/fixtures/tiny_parity.json: llama.cpp's logits on the tiny models tests/tiny_parity.rs writes (a
# Llama 3-style model with RoPE frequency factors, a Qwen3 model). Needs the peer built by
# ../shared/tools/llamacpp-peer.sh (PEER_DIR, default ~/.cache/llamacpp-peer). Takes seconds.
#   bash scripts/parity/make_tiny_fixture.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PEER_DIR=${PEER_DIR:-$HOME/.cache/llamacpp-peer}
PY="$PEER_DIR/venv/bin/python"
[ -x "$PY" ] || { echo "no llama.cpp peer at $PEER_DIR: run ../shared/tools/llamacpp-peer.sh first" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
HAYLOFT_TINY_OUT="$tmp" cargo test --release --test tiny_parity -- --ignored --exact write_fixture_models --nocapture
OMP_WAIT_POLICY=passive "$PY" scripts/parity/make_tiny_fixture.py tests/fixtures/tiny_parity.json \
    "bash scripts/parity/make_tiny_fixture.sh" "$tmp"/*.gguf
