#!/usr/bin/env bash
# hayloft vs llama.cpp on the same GGUF file, same thread count, same contexts, in one run.
#
#   bench/vs-llamacpp.sh [--model M.gguf] [--threads 2 | 1,2,4,8,16] [--contexts 512,2048,4096,8192] [--reps 3] [--gen 32]
#                        [--out DIR] [--llama-only | --hayloft-only] [--llama-json FILE] [-- extra llama-bench args]
#
# Prints tok/s (median of --reps repetitions) and the ratio hayloft / llama.cpp for
#   prefill N   : N tokens from an empty context            (llama-bench -p N -n 0)
#   decode  0   : generating --gen tokens, empty context    (llama-bench -p 0 -n 32)
#   decode  N   : generating --gen tokens after N cached    (llama-bench -p 0 -n 32 -d N)
# hayloft's side is `hayloft bench speed --model M --threads T --contexts ... --reps R --json OUT.json`.
# --threads may be a list: both engines run every count (llama-bench -t takes the same list) and the table has one
# block per count, then hayloft's and llama.cpp's scaling over the counts.
#
# Model: --model, else $HAYLOFT_MODEL, else SmolLM2-135M-Instruct.Q4_1.gguf where `hayloft fetch` or /tmp/models
# put it. llama.cpp: $LLAMA_BENCH, else $PEER_DIR/bin/llama-bench (PEER_DIR default ~/.cache/llamacpp-peer), built
# by ../shared/tools/llamacpp-peer.sh. hayloft: $HAYLOFT, else target/release/hayloft (built if missing).
# llama.cpp runs with --repack 0 (its AMX repacking SIGILLs on these machines) and its default OpenMP wait policy
# (OMP_WAIT_POLICY is removed from the environment: with `passive`, which this script set until 2026-11-30, its
# threads sleep between ops and its decode ran about 3x slower on the 2-core machine); the flash-attention setting is
# llama-bench's default (auto) unless passed after `--`, and is printed.
# Raw results stay in --out (default: a fresh temp dir): llama.json, hayloft.json, table.txt.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
MODEL=${HAYLOFT_MODEL:-}
THREADS=2
CONTEXTS=512,2048,4096,8192
REPS=3
GEN=32
OUT=""
RUN_LLAMA=1
RUN_HAYLOFT=1
LLAMA_JSON=""
EXTRA=()
usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    -m|--model) MODEL=$2; shift 2 ;;
    -t|--threads) THREADS=$2; shift 2 ;;
    -c|--contexts) CONTEXTS=$2; shift 2 ;;
    -r|--reps) REPS=$2; shift 2 ;;
    --gen) GEN=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --llama-only) RUN_HAYLOFT=0; shift ;;
    --hayloft-only) RUN_LLAMA=0; shift ;;
    --llama-json) LLAMA_JSON=$2; RUN_LLAMA=0; shift 2 ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "unknown argument: $1" >&2; usage 2 ;;
  esac
done
[[ "$CONTEXTS" =~ ^[0-9]+(,[0-9]+)*$ ]] || { echo "--contexts must be a comma-separated list of integers" >&2; exit 2; }
[[ "$THREADS" =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] || { echo "--threads must be a thread count or a comma-separated list of them" >&2; exit 2; }

HAYLOFT=${HAYLOFT:-$ROOT/target/release/hayloft}
if [ -z "$MODEL" ]; then
  for c in "$HOME/.cache/hayloft/models/SmolLM2-135M-Instruct.Q4_1.gguf" \
           "$HOME/.cache/hayloft/SmolLM2-135M-Instruct.Q4_1.gguf" \
           /tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf; do
    [ -f "$c" ] && { MODEL=$c; break; }
  done
fi
[ -n "$MODEL" ] && [ -f "$MODEL" ] || {
  echo "no model: pass --model M.gguf or set HAYLOFT_MODEL (default SmolLM2-135M-Instruct.Q4_1.gguf, via hayloft fetch)" >&2
  exit 2; }

OUT=${OUT:-$(mktemp -d /tmp/vs-llamacpp.XXXXXX)}
mkdir -p "$OUT"
unset OMP_WAIT_POLICY
echo "model:    $MODEL"
echo "threads:  $THREADS   contexts: $CONTEXTS   reps: $REPS   decode tokens: $GEN   results: $OUT"

# ---- llama.cpp -----------------------------------------------------------------------------------------------
if [ -n "$LLAMA_JSON" ]; then
  cp "$LLAMA_JSON" "$OUT/llama.json"
elif [ "$RUN_LLAMA" = 1 ]; then
  PEER_DIR=${PEER_DIR:-$HOME/.cache/llamacpp-peer}
  LB=${LLAMA_BENCH:-$PEER_DIR/bin/llama-bench}
  [ -x "$LB" ] || { echo "no llama-bench at $LB: run ../shared/tools/llamacpp-peer.sh (or set LLAMA_BENCH)" >&2; exit 1; }
  # Its first line only, without a pipe into head: llama-bench writes a second line, which can die of SIGPIPE once head
  # has exited, and under pipefail that ended this script silently.
  LB_VERSION=$("$LB" --version 2>&1 || true)
  echo "llama.cpp: ${LB_VERSION%%$'\n'*}"
  common=(-m "$MODEL" -t "$THREADS" -r "$REPS" --repack 0 --progress -o json ${EXTRA[@]+"${EXTRA[@]}"})
  echo "+ $LB ${common[*]} -p $CONTEXTS -n 0" >&2
  "$LB" "${common[@]}" -p "$CONTEXTS" -n 0 > "$OUT/llama-prefill.json" 2> "$OUT/llama-prefill.log" \
    || { tail -20 "$OUT/llama-prefill.log" >&2; echo "llama-bench (prefill) failed" >&2; exit 1; }
  echo "+ $LB ${common[*]} -p 0 -n $GEN -d 0,$CONTEXTS" >&2
  "$LB" "${common[@]}" -p 0 -n "$GEN" -d "0,$CONTEXTS" > "$OUT/llama-decode.json" 2> "$OUT/llama-decode.log" \
    || { tail -20 "$OUT/llama-decode.log" >&2; echo "llama-bench (decode) failed" >&2; exit 1; }
  python3 -c 'import json,sys; json.dump([r for f in sys.argv[2:] for r in json.load(open(f))], open(sys.argv[1],"w"), indent=1)' \
    "$OUT/llama.json" "$OUT/llama-prefill.json" "$OUT/llama-decode.json"
fi

# ---- hayloft -------------------------------------------------------------------------------------------------
HAYLOFT_STATUS=skipped
if [ "$RUN_HAYLOFT" = 1 ]; then
  if [ ! -x "$HAYLOFT" ] && [ -z "${HAYLOFT_NO_BUILD:-}" ]; then
    echo "+ cargo build --release (no $HAYLOFT)" >&2
    (cd "$ROOT" && cargo build --release) >&2 || true
  fi
  if [ ! -x "$HAYLOFT" ]; then
    HAYLOFT_STATUS="no hayloft binary at $HAYLOFT (cargo build --release failed or was skipped)"
  else
    rm -f "$OUT/hayloft.json"
    echo "+ $HAYLOFT bench speed --model $MODEL --threads $THREADS --contexts $CONTEXTS --reps $REPS --json $OUT/hayloft.json" >&2
    if "$HAYLOFT" bench speed --model "$MODEL" --threads "$THREADS" --contexts "$CONTEXTS" --reps "$REPS" \
         --json "$OUT/hayloft.json" > "$OUT/hayloft.log" 2>&1 && [ -s "$OUT/hayloft.json" ]; then
      HAYLOFT_STATUS=ok
    else
      tail -5 "$OUT/hayloft.log" >&2
      HAYLOFT_STATUS="'hayloft bench speed' failed or wrote no $OUT/hayloft.json (does this hayloft have the bench speed command yet? log: $OUT/hayloft.log)"
    fi
  fi
fi

# ---- table ---------------------------------------------------------------------------------------------------
python3 - "$OUT" "$CONTEXTS" "$HAYLOFT_STATUS" "$THREADS" <<'EOF' | tee "$OUT/table.txt"
import json, os, statistics, sys
out, contexts, hstatus = sys.argv[1], [int(c) for c in sys.argv[2].split(",")], sys.argv[3]
threads = [int(t) for t in sys.argv[4].split(",")]
rows = [("prefill", c) for c in contexts] + [("decode", 0)] + [("decode", c) for c in contexts]

llama, info = {}, ""
path = os.path.join(out, "llama.json")
if os.path.exists(path):
    recs = json.load(open(path))
    for r in recs:
        samples = r.get("samples_ts") or [r["avg_ts"]]
        med = statistics.median(samples)
        t = int(r.get("n_threads", threads[0]))
        if r["n_prompt"] > 0 and r["n_gen"] == 0 and r.get("n_depth", 0) == 0:
            llama[("prefill", r["n_prompt"], t)] = med
        elif r["n_prompt"] == 0 and r["n_gen"] > 0:
            llama[("decode", r.get("n_depth", 0), t)] = med
    if recs:
        r = recs[0]
        fa = {-1: "auto", 0: "off", 1: "on", True: "on", False: "off"}
        info = (f"llama.cpp {r.get('build_commit', '?')} (build {r.get('build_number', '?')}), {r.get('backends', '?')}, "
                f"type_k {r.get('type_k')}, flash_attn {fa.get(r.get('flash_attn'), r.get('flash_attn'))}, n_batch {r.get('n_batch')}, "
                f"n_ubatch {r.get('n_ubatch')}, reps {len(r.get('samples_ts') or [])}")

hay, hinfo = {}, ""
path = os.path.join(out, "hayloft.json")
if hstatus == "ok":
    h = json.load(open(path))
    one = h.get("threads")
    one = one[0] if isinstance(one, list) and len(one) == 1 else one
    for r in h.get("results", []):
        hay[(r["test"], int(r["ctx"]), int(r.get("threads", one)))] = float(r["tok_s"])
    hinfo = f"hayloft kernel {h.get('kernel', '?')}, threads {h.get('threads', '?')}"

def f(x):
    return f"{x:10.1f}" if x is not None else f"{'-':>10}"

for t in threads:
    print(f"{'test':<8} {'ctx':>6} {'hayloft':>10} {'llama.cpp':>10} {'ratio':>7}   (tok/s, median, {t} threads)")
    for key in rows:
        a, b = hay.get(key + (t,)), llama.get(key + (t,))
        ratio = f"{a / b:7.2f}" if a and b else f"{'-':>7}"
        print(f"{key[0]:<8} {key[1]:>6} {f(a)} {f(b)} {ratio}")
if len(threads) > 1:
    print(f"scaling over {threads[0]} threads: hayloft / llama.cpp")
    for key in rows:
        cells = []
        for t in threads:
            a0, a = hay.get(key + (threads[0],)), hay.get(key + (t,))
            b0, b = llama.get(key + (threads[0],)), llama.get(key + (t,))
            sa = f"{a / a0:.2f}x" if a and a0 else "-"
            sb = f"{b / b0:.2f}x" if b and b0 else "-"
            cells.append(f"{t}t {sa}/{sb}")
        print(f"{key[0]:<8} {key[1]:>6}  " + "  ".join(cells))
if info:
    print(info)
if hinfo:
    print(hinfo)
if hstatus not in ("ok", "skipped"):
    print(f"hayloft: {hstatus}")
EOF
[ "$HAYLOFT_STATUS" = ok ] || [ "$HAYLOFT_STATUS" = skipped ] || exit 3
