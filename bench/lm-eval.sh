#!/usr/bin/env bash
# lm-evaluation-harness (`local-completions`) against `hayloft serve`, then lm-eval's log-likelihoods checked against
# hayloft's own scoring of the same token ids.
#
#   bench/lm-eval.sh [--model M] [--venv DIR] [--out DIR] [--batch N] [--concurrent N] [--tokenized true|false]
#                    [--tasks hayloft_mc,hayloft_gen] [--threads T] [--tol 1e-3]
#
# 1. A venv (default $HAYLOFT_HOME/lm-eval-venv) with lm-eval 0.4.13 from bench/lm-eval-requirements.txt, installed
#    with --no-deps (no torch; about 0.8 GB, 1-2 minutes the first time, reused after).
# 2. `hayloft serve` on --model (default smollm2-135m, fetched on first use) on a free port.
# 3. lm_eval over the task YAMLs in bench/lm-eval-tasks/ (local JSONL, nothing from the hub): hayloft_mc, a
#    4-choice log-likelihood task (acc, acc_norm), and hayloft_gen, greedy generation with exact match. The remote
#    tokenizer (/tokenize, /detokenize, /tokenizer_info) stands in for a Hugging Face one.
# 4. bench/lm-eval-check.py rebuilds every log-likelihood request's token ids with lm-eval's own code, scores them
#    with `hayloft perplexity --pairs` (one session from an empty cache, no server) and fails when a score differs
#    from lm-eval's by more than --tol or an is_greedy flag differs.
# Output (lm-eval's results and samples, pairs.jsonl, server.log, report.txt) stays in --out (default: a temp dir).
# hayloft: $HAYLOFT, else target/release/hayloft (built if missing).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
HAYLOFT_HOME="${HAYLOFT_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/hayloft}"
MODEL=smollm2-135m
VENV="$HAYLOFT_HOME/lm-eval-venv"
OUT=""
BATCH=4
CONCURRENT=1
TOKENIZED=true
TASKS=hayloft_mc,hayloft_gen
THREADS=""
TOL=1e-3
usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    -m|--model) MODEL=$2; shift 2 ;;
    --venv) VENV=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --batch) BATCH=$2; shift 2 ;;
    --concurrent) CONCURRENT=$2; shift 2 ;;
    --tokenized) TOKENIZED=$2; shift 2 ;;
    --tasks) TASKS=$2; shift 2 ;;
    -t|--threads) THREADS=$2; shift 2 ;;
    --tol) TOL=$2; shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "unknown argument: $1" >&2; usage 2 ;;
  esac
done
[[ "$BATCH" =~ ^[1-9][0-9]*$ ]] || { echo "--batch must be a positive integer, got '$BATCH'" >&2; exit 2; }
[[ "$CONCURRENT" =~ ^[1-9][0-9]*$ ]] || { echo "--concurrent must be a positive integer, got '$CONCURRENT'" >&2; exit 2; }
[[ "$TOKENIZED" =~ ^(true|false)$ ]] || { echo "--tokenized must be true or false, got '$TOKENIZED'" >&2; exit 2; }
[ -z "$THREADS" ] || [[ "$THREADS" =~ ^[1-9][0-9]*$ ]] || { echo "--threads must be a positive integer" >&2; exit 2; }
[ -n "$OUT" ] || OUT="$(mktemp -d -t hayloft-lm-eval.XXXXXX)"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

HAYLOFT=${HAYLOFT:-$ROOT/target/release/hayloft}
if [ ! -x "$HAYLOFT" ]; then
  echo "building hayloft (cargo build --release)" >&2
  (cd "$ROOT" && cargo build --release)
fi

# 1. The venv, reinstalled when the requirements file changes.
REQ="$ROOT/bench/lm-eval-requirements.txt"
STAMP="$VENV/.hayloft-requirements"
if ! [ -x "$VENV/bin/python" ] || ! cmp -s "$REQ" "$STAMP"; then
  echo "installing lm-eval into $VENV (first time: a minute or two)" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -r "$REQ"
  cp "$REQ" "$STAMP"
fi
"$VENV/bin/python" -c "import torch" 2>/dev/null && echo "note: torch is present in $VENV (not needed here)" >&2

# 2. The server, stopped on exit (by its own pid).
PORT=$("$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
SERVE_ARGS=(serve -m "$MODEL" --port "$PORT")
[ -z "$THREADS" ] || SERVE_ARGS+=(-t "$THREADS")
"$HAYLOFT" "${SERVE_ARGS[@]}" >"$OUT/server.log" 2>&1 &
SERVER_PID=$!
trap 'kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true' EXIT
BASE="http://127.0.0.1:$PORT"
"$VENV/bin/python" - "$BASE" "$SERVER_PID" <<'EOF' || { echo "hayloft serve did not come up; its log:" >&2; cat "$OUT/server.log" >&2; exit 1; }
import os, sys, time, urllib.request
base, pid = sys.argv[1], int(sys.argv[2])
deadline = time.time() + 300  # a first run may fetch the model
while time.time() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("the server exited")
    try:
        if urllib.request.urlopen(base + "/health", timeout=2).status == 200:
            sys.exit(0)
    except Exception:
        pass
    time.sleep(0.3)
sys.exit("no 200 from /health within 300 s")
EOF

# 3. lm-eval, from the tasks folder so the YAMLs' relative data_files resolve; the hub is never asked.
export HF_HOME="$OUT/hf" HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
MODEL_ARGS="base_url=$BASE/v1/completions,model=$(basename "$MODEL"),tokenizer_backend=remote,tokenized_requests=$TOKENIZED,num_concurrent=$CONCURRENT,max_retries=1"
T0=$(date +%s)
(cd "$ROOT/bench/lm-eval-tasks" && "$VENV/bin/lm_eval" --model local-completions --model_args "$MODEL_ARGS" \
  --batch_size "$BATCH" --tasks "$TASKS" --include_path . --output_path "$OUT/lm-eval" --log_samples) \
  >"$OUT/lm-eval.log" 2>&1 || { echo "lm_eval failed; the end of its log:" >&2; tail -30 "$OUT/lm-eval.log" >&2; exit 1; }
T1=$(date +%s)
SAMPLES=$(dirname "$(find "$OUT/lm-eval" -name 'samples_*.jsonl' -print -quit)")

# 4. The equality check, then the report.
CHECK_ARGS=(--samples "$SAMPLES" --base-url "$BASE/v1/completions" --hayloft "$HAYLOFT" --model "$MODEL" --tol "$TOL"
  --pairs-out "$OUT/pairs.jsonl")
[ "$TOKENIZED" = true ] || CHECK_ARGS+=(--text-prompts)
set +e
CHECK=$("$VENV/bin/python" "$ROOT/bench/lm-eval-check.py" "${CHECK_ARGS[@]}" 2>&1)
RC=$?
set -e
{
  echo "lm-eval 0.4.13 local-completions against hayloft serve ($MODEL), batch $BATCH, concurrent $CONCURRENT,"
  echo "tokenized_requests=$TOKENIZED, tasks $TASKS: $((T1 - T0)) s"
  echo
  grep '^|' "$OUT/lm-eval.log"
  echo
  echo "lm-eval's log-likelihoods vs hayloft perplexity --pairs:"
  echo "$CHECK"
  echo
  echo "output in $OUT"
} | tee "$OUT/report.txt"
exit $RC
