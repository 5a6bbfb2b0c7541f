#!/usr/bin/env bash
# hayloft serve vs llama-server (continuous batching, N slots) on the same GGUF, thread count and workload, in one run.
#
#   bench/vs-llama-server.sh [--model M.gguf] [--threads 2] [--parallel 8] [--clients 1,8] [--requests 16]
#                            [--prompt-tokens 1024] [--max-tokens 64] [--out DIR]
#
# For each server and each client count C, a fresh server is started and `hayloft bench serve --url` sends --requests unique prompts of
# --prompt-tokens token ids (no shared prefix, so no prefix cache helps either server), C at a time, each generating
# --max-tokens tokens with end-of-generation ignored, greedy, streamed. It prints generated tok/s, aggregate decode
# tok/s (sum over the clients decoding at once), TTFT p50 and the ratio hayloft / llama-server, and each server's
# batching gain (C clients vs the first count).
# llama-server: -np --parallel, -c parallel × (prompt + max tokens + 64), -t --threads, its default continuous
# batching, --no-webui. hayloft serve: --parallel, --threads, prefix cache off.
# Model: --model, else $HAYLOFT_MODEL, else SmolLM2-135M-Instruct.Q4_1.gguf under $HAYLOFT_HOME/models.
# llama-server: $LLAMA_SERVER, else $PEER_DIR/bin/llama-server (PEER_DIR default ~/.cache/llamacpp-peer), built by
# ../shared/tools/llamacpp-peer.sh. hayloft: $HAYLOFT, else target/release/hayloft.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
HOME_DIR=${HAYLOFT_HOME:-$HOME/.cache/hayloft}
MODEL=${HAYLOFT_MODEL:-$HOME_DIR/models/SmolLM2-135M-Instruct.Q4_1.gguf}
THREADS=2
PARALLEL=8
CLIENTS=1,8
REQUESTS=16
PROMPT=1024
MAXTOK=64
OUT=""
usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    -m|--model) MODEL=$2; shift 2 ;;
    -t|--threads) THREADS=$2; shift 2 ;;
    --parallel) PARALLEL=$2; shift 2 ;;
    --clients) CLIENTS=$2; shift 2 ;;
    --requests) REQUESTS=$2; shift 2 ;;
    --prompt-tokens) PROMPT=$2; shift 2 ;;
    --max-tokens) MAXTOK=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "unknown argument: $1" >&2; usage 2 >&2 ;;
  esac
done
PEER_DIR=${PEER_DIR:-$HOME/.cache/llamacpp-peer}
LLAMA_SERVER=${LLAMA_SERVER:-$PEER_DIR/bin/llama-server}
HAYLOFT=${HAYLOFT:-$ROOT/target/release/hayloft}
[ -f "$MODEL" ] || { echo "model not found: $MODEL (hayloft fetch smollm2-135m, or --model)" >&2; exit 1; }
[ -x "$LLAMA_SERVER" ] || { echo "llama-server not found at $LLAMA_SERVER: build it with ../shared/tools/llamacpp-peer.sh" >&2; exit 1; }
[ -x "$HAYLOFT" ] || (cd "$ROOT" && cargo build --release)
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PID=""
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null || true; }
trap cleanup EXIT
wait_health() {
  for _ in $(seq 1 600); do
    if curl -sf "http://127.0.0.1:$1/health" >/dev/null 2>&1; then return 0; fi
    kill -0 "$PID" 2>/dev/null || { echo "server exited; log: $2" >&2; tail -20 "$2" >&2; exit 1; }
    sleep 0.2
  done
  echo "server on port $1 not healthy after 120 s; log: $2" >&2; exit 1
}
# One fresh server per client count: the prompts are the same in every run, and a server that has seen them would
# answer from its prompt cache (llama-server keeps each slot's last prompt, and its prompt cache, across requests).
run_one() { # engine clients
  local port log
  port=$(free_port)
  log="$OUT/$1-c$2.log"
  if [ "$1" = llama ]; then
    "$LLAMA_SERVER" -m "$MODEL" -np "$PARALLEL" -c "$CTX" -t "$THREADS" --port "$port" --no-webui >"$log" 2>&1 &
  else
    "$HAYLOFT" serve --model "$MODEL" --threads "$THREADS" --parallel "$PARALLEL" --prefix-cache-ram 0 \
      --port "$port" >"$log" 2>&1 &
  fi
  PID=$!
  wait_health "$port" "$log"
  "$HAYLOFT" bench serve --url "http://127.0.0.1:$port" --clients "$2" --requests "$REQUESTS" \
    --prompt-tokens "$PROMPT" --shared 0 --max-tokens "$MAXTOK" --json "$OUT/$1-c$2.json" >"$OUT/$1-c$2.txt" 2>&1 \
    || { echo "$1 with $2 clients failed:" >&2; cat "$OUT/$1-c$2.txt" >&2; exit 1; }
  kill "$PID"; wait "$PID" 2>/dev/null || true; PID=""
}
CTX=$(( PARALLEL * (PROMPT + MAXTOK + 64) ))
for e in llama hayloft; do
  for c in ${CLIENTS//,/ }; do run_one "$e" "$c"; done
done
python3 - "$OUT" "$CLIENTS" <<'PY' | tee "$OUT/table.txt"
import json, sys
out, clients = sys.argv[1], [int(c) for c in sys.argv[2].split(",")]
r = {(e, c): json.load(open(f"{out}/{e}-c{c}.json")) for e in ("hayloft", "llama") for c in clients}
print("| clients | metric | hayloft | llama-server | hayloft / llama-server |")
print("|---|---|---|---|---|")
for c in clients:
    for key, name, better_high in (("generated_tokens_per_s", "generated tok/s", True),
                                   ("aggregate_decode_tokens_per_s", "aggregate decode tok/s", True),
                                   ("ttft_p50", "TTFT p50 (s)", False)):
        get = (lambda j: j["ttft_s"]["p50"]) if key == "ttft_p50" else (lambda j, k=key: j[k])
        h, l = get(r[("hayloft", c)]), get(r[("llama", c)])
        ratio = (h / l if better_high else l / h) if h and l else float("nan")
        print(f"| {c} | {name} | {h:.2f} | {l:.2f} | {ratio:.2f}×{'' if better_high else ' (faster)'} |")
    for e in ("hayloft", "llama"):
        if r[(e, c)]["failed"]:
            print(f"warning: {e} had {r[(e, c)]['failed']} failed requests with {c} clients")
c0 = clients[0]
for e, name in (("hayloft", "hayloft"), ("llama", "llama-server")):
    base = r[(e, c0)]["generated_tokens_per_s"]
    gains = ", ".join(f"{c} clients {r[(e, c)]['generated_tokens_per_s'] / base:.2f}×" for c in clients[1:])
    print(f"{name} batching gain over {c0} client(s), generated tok/s: {gains}")
PY
echo "raw results: $OUT"
