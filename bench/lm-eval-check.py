"""Checks lm-evaluation-harness's log-likelihoods (read from its --log_samples files) against hayloft's own scoring.

For every (context, continuation) request of every log-likelihood task in the samples folder, the token ids lm-eval
sent are rebuilt with lm-eval's own code (`_encode_pair` of a `local-completions` model on the same server's
/tokenize, so the split between context and continuation is lm-eval's), scored by
`hayloft perplexity --pairs` (one session from an empty cache, no server), and compared with what lm-eval recorded.
Exits 1 when a score differs by more than --tol or an is_greedy flag differs.

Run with the venv's python while `hayloft serve` is up:
    python bench/lm-eval-check.py --samples OUT/model --base-url http://127.0.0.1:PORT/v1/completions \
        --hayloft target/release/hayloft --model M.gguf [--tol 1e-3] [--pairs-out pairs.jsonl]
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile


def loglik_samples(folder):
    """(task, doc_id, [(context, continuation, logprob, is_greedy)], target, acc) per sample of a log-likelihood task."""
    files = sorted(glob.glob(os.path.join(folder, "samples_*.jsonl")))
    if not files:
        sys.exit(f"no samples_*.jsonl in {folder}: run lm_eval with --log_samples --output_path")
    out = []
    for f in files:
        task = os.path.basename(f)[len("samples_"):].rsplit("_", 1)[0]
        with open(f) as fh:
            for line in fh:
                s = json.loads(line)
                args = [s["arguments"][k] for k in sorted(s["arguments"], key=lambda k: int(k.rsplit("_", 1)[1]))]
                if not args or not isinstance(args[0].get("arg_1"), str):
                    continue  # a generation task: arg_1 is its gen_kwargs
                reqs = []
                for a, r in zip(args, s["resps"]):
                    lp, greedy = r[0]
                    reqs.append((a["arg_0"], a["arg_1"], float(lp), str(greedy) == "True"))
                out.append((task, s["doc_id"], reqs, s.get("target"), s.get("acc")))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", required=True, help="lm-eval's output folder holding samples_*.jsonl")
    ap.add_argument("--base-url", required=True, help="the /v1/completions URL lm-eval used")
    ap.add_argument("--hayloft", required=True, help="the hayloft binary")
    ap.add_argument("--model", required=True, help="the GGUF file the server runs")
    ap.add_argument("--tol", type=float, default=1e-3, help="largest |lm-eval - hayloft| allowed per request")
    ap.add_argument("--text-prompts", action="store_true",
                    help="lm-eval ran with tokenized_requests=False: the server tokenized the text itself and put BOS "
                         "in front when the model asks for one, so score with that BOS too")
    ap.add_argument("--pairs-out", help="keep the token-id pairs and hayloft's scores here (JSONL)")
    a = ap.parse_args()

    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(base_url=a.base_url, tokenizer_backend="remote", tokenized_requests=True)
    samples = loglik_samples(a.samples)
    if not samples:
        sys.exit(f"no log-likelihood samples in {a.samples}")
    # With text prompts the server adds BOS where the GGUF asks for it (and leaves it out of the echo).
    info = lm.tokenizer.tokenizer_info
    lead = [info["bos_token_id"]] if a.text_prompts and info.get("add_bos_token") else []
    pairs = []
    for _, _, reqs, _, _ in samples:
        for ctx, cont, _, _ in reqs:
            if ctx == "":
                # lm-eval's loglikelihood: an empty context becomes the prefix token alone.
                c, k = [lm.prefix_token_id], lm.tok_encode(cont)
            else:
                c, k = lm._encode_pair(ctx, cont)
            pairs.append({"context": lead + c, "continuation": k})

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "pairs.jsonl")
        with open(path, "w") as f:
            for p in pairs:
                f.write(json.dumps(p) + "\n")
        r = subprocess.run([a.hayloft, "perplexity", "-m", a.model, "--pairs", path],
                           capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"hayloft perplexity --pairs failed ({r.returncode}):\n{r.stderr}")
    ours = [json.loads(l) for l in r.stdout.splitlines() if l.strip()]
    if len(ours) != len(pairs):
        sys.exit(f"hayloft scored {len(ours)} pairs, expected {len(pairs)}")

    i, worst, sum_d, greedy_diff, acc_lm, acc_ours, n_docs = 0, (0.0, None), 0.0, [], 0, 0, 0
    rows = []
    for task, doc, reqs, target, acc in samples:
        theirs_lp, ours_lp = [], []
        for ctx, cont, lp, greedy in reqs:
            o = ours[i]
            d = abs(lp - o["logprob"])
            sum_d += d
            if d > worst[0]:
                worst = (d, (task, doc, cont, lp, o["logprob"]))
            if greedy != o["greedy"]:
                greedy_diff.append((task, doc, cont, greedy, o["greedy"]))
            rows.append({**pairs[i], **o, "task": task, "doc_id": doc, "lm_eval_logprob": lp,
                         "lm_eval_greedy": greedy})
            theirs_lp.append(lp)
            ours_lp.append(o["logprob"])
            i += 1
        if acc is not None and target is not None and len(reqs) > 1:
            n_docs += 1
            t = int(target)
            acc_lm += int(max(range(len(theirs_lp)), key=theirs_lp.__getitem__) == t)
            acc_ours += int(max(range(len(ours_lp)), key=ours_lp.__getitem__) == t)
    if a.pairs_out:
        with open(a.pairs_out, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")

    n = len(pairs)
    print(f"requests checked      {n} (from {len(samples)} documents)")
    print(f"continuation tokens   {sum(p['n'] for p in ours)}")
    print(f"max |delta| logprob   {worst[0]:.3e}  (tolerance {a.tol:g})")
    print(f"mean |delta| logprob  {sum_d / n:.3e}")
    if worst[1]:
        t, d, c, x, y = worst[1]
        print(f"  worst: {t} doc {d} continuation {c!r}: lm-eval {x:.6f}, hayloft {y:.6f}")
    print(f"is_greedy differences {len(greedy_diff)}")
    for g in greedy_diff[:5]:
        print(f"  {g}")
    if n_docs:
        print(f"acc from lm-eval's scores {acc_lm / n_docs:.4f}, from hayloft's {acc_ours / n_docs:.4f} "
              f"({n_docs} documents)")
    ok = worst[0] <= a.tol and not greedy_diff
    print("EQUAL within tolerance" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
