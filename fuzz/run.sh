#!/usr/bin/env bash
# Runs every fuzz target (or the ones named) for N executions each, one after the other, one job each.
#   fuzz/run.sh [-n N] [target ...]      N defaults to 1000000; targets: gguf tokenizer chat kvspec longbench
# Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). New corpus entries go to
# fuzz/corpus/<target>/ (minimize with `cargo +nightly fuzz cmin <target>` before committing); a crash stops that
# target and leaves its input in fuzz/artifacts/<target>/. Logs go to fuzz/logs/<target>.log.
set -euo pipefail
cd "$(dirname "$0")"
N=1000000
if [[ "${1:-}" == "-n" ]]; then N="$2"; shift 2; fi
TARGETS=("$@")
[[ ${#TARGETS[@]} -gt 0 ]] || TARGETS=(gguf tokenizer chat kvspec longbench)
max_len() {
    case "$1" in
        gguf) echo 32768 ;;        # the seed models are ~21 KB
        kvspec) echo 256 ;;
        *) echo 4096 ;;
    esac
}
mkdir -p logs
status=0
for t in "${TARGETS[@]}"; do
    echo "== $t: $N runs"
    # -a: debug assertions (integer overflow checks) on; -rss/-malloc limits catch allocations out of proportion
    # to the input; -timeout catches hangs.
    if cargo +nightly fuzz run -O -a "$t" "corpus/$t" -- -runs="$N" -max_len="$(max_len "$t")" \
        -rss_limit_mb=2048 -malloc_limit_mb=1024 -timeout=5 -print_final_stats=1 >"logs/$t.log" 2>&1; then
        grep -E '^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)' "logs/$t.log"
        echo "corpus: $(ls "corpus/$t" | wc -l) files"
    else
        echo "$t FAILED: see fuzz/logs/$t.log and fuzz/artifacts/$t/"
        status=1
    fi
done
exit $status
