#!/usr/bin/env bash
# Rebuilds tests/fixtures/parity_{smollm2,gemma3,qwen25}.json from llama.cpp (see make_fixture.py's header).
#   bash scripts/parity/make_fixture.sh [--only smollm2|gemma3|qwen25] [--smollm2 PATH] [--gemma3 PATH]
#                                       [--qwen25 PATH] [--seed N]
# Needs the peer built by ../shared/tools/llamacpp-peer.sh (PEER_DIR, default ~/.cache/llamacpp-peer).
# Takes a few minutes per model on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
PEER_DIR=${PEER_DIR:-$HOME/.cache/llamacpp-peer}
PY="$PEER_DIR/venv/bin/python"
[ -x "$PY" ] || { echo "no llama.cpp peer at $PEER_DIR: run ../shared/tools/llamacpp-peer.sh first" >&2; exit 1; }
export OMP_WAIT_POLICY=passive
export PARITY_COMMAND="bash scripts/parity/make_fixture.sh${*:+ $*}"
exec "$PY" scripts/parity/make_fixture.py "$@"
