#!/usr/bin/env python3
"""Teacher-forced reference logits from llama.cpp, for hayloft's parity tests.

Writes tests/fixtures/parity_{smollm2,gemma3,qwen25}.json: for a few fixed token sequences,
llama.cpp's logits at (many) positions, as the top-64 (token id, logit) pairs plus the logsumexp over the full
vocabulary, so a test can compare probabilities of the top-64 and of the tail bucket (1 - their mass).

How to rebuild
--------------
1. Build the peer (llama.cpp + llama-cpp-python in a venv, ~15-25 min on 2 cores; not for CI):
       bash ../shared/tools/llamacpp-peer.sh            # -> ~/.cache/llamacpp-peer
   (the copy used here lives at /work/shared/tools/llamacpp-peer.sh)
2. Get the GGUF files (sha256 are checked; looked up in ~/.cache/hayloft/models, where `hayloft fetch` puts
   them, then /tmp/models; or pass --smollm2 / --gemma3 / --qwen25, or set SMOLLM2_GGUF / GEMMA3_GGUF / QWEN25_GGUF):
       SmolLM2-135M-Instruct.Q4_1.gguf          b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
       gemma-3-270m-q4_k_m.gguf                 a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
       qwen2.5-coder-0.5b-instruct-q4_k_m.gguf  1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
3. From the repository root:
       bash scripts/parity/make_fixture.sh                       # every model
       bash scripts/parity/make_fixture.sh --only smollm2 --smollm2 PATH.gguf
   or directly:  OMP_WAIT_POLICY=passive ~/.cache/llamacpp-peer/venv/bin/python scripts/parity/make_fixture.py [...]

Determinism: the long sequence is sampled by this script (numpy Generator seeded with --seed, temperature 0.8,
top-p 0.95, repetition penalty 1.1 over the last 128 tokens, no repeated 5-grams, end-of-generation and control
tokens masked) from llama.cpp's logits; everything else is fixed text.
Given the same llama.cpp build, thread count and seed, the output is identical. Only token ids are stored for the
long sequence; the short texts below were written for this fixture (no third-party text).

Notes: llama.cpp's AMX kernels SIGILL on these machines, so extra buffer types (repacking) are disabled below;
logits are computed with n_threads=2, n_batch=512 (so long sequences are evaluated in 512-token batches, each seeing
the KV cache of the previous ones, exactly like Llama.eval).
"""
import argparse
import hashlib
import json
import math
import os
import shlex
import sys
import time

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import llama_cpp  # noqa: E402
import llama_cpp.llama_cpp as L  # noqa: E402

# AMX kernels die with SIGILL here: turn off extra buffer types (see llamacpp-peer.sh).
_default_model_params = L.llama_model_default_params
L.llama_model_default_params = lambda: (lambda p: (setattr(p, "use_extra_bufts", False), p)[1])(_default_model_params())

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TOP_K = 64
N_BATCH = 512
N_THREADS = 2
ALL_POSITIONS_MAX = 512     # texts up to this length store every position
LONG_STRIDE = 8             # longer ones: every 8th position ...
LONG_TAIL = 64              # ... plus the last 64

# ---------------------------------------------------------------------------------------------------------------
# Texts, written for this fixture.

PROSE = (
    "Early in the morning the barn was still cold, and the light that came through the gaps between the boards "
    "fell across the floor in thin yellow stripes. Marta climbed the ladder to the loft, where the hay was stacked "
    "almost to the rafters, and sat for a while listening to the swallows. Below her the horses shifted their "
    "weight and breathed out clouds of steam. She had promised her brother she would count the bales before "
    "breakfast, but the numbers kept slipping away from her, and in the end she simply lay back and watched the "
    "dust turn slowly in the air."
)

NUMBERS = (
    "Squares: 1, 4, 9, 16, 25, 36, 49, 64, 81, 100, 121, 144, 169, 196, 225, 256.\n"
    "Primes: 2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61.\n"
    "Powers of two: 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192.\n"
    "Fibonacci: 0, 1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987."
)

CODE = '''def merge_sorted(a, b):
    """Merge two sorted lists into one sorted list."""
    out = []
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            out.append(a[i])
            i += 1
        else:
            out.append(b[j])
            j += 1
    out.extend(a[i:])
    out.extend(b[j:])
    return out


if __name__ == "__main__":
    print(merge_sorted([1, 4, 9], [2, 3, 10, 12]))
'''

FACTS = (
    "The capital of France is Paris. The capital of Japan is Tokyo, and the capital of Canada is Ottawa. "
    "Water boils at 100 degrees Celsius at sea level. The Earth orbits the Sun once every 365.25 days, "
    "and the Moon orbits the Earth roughly once every 27 days."
)

SMOLLM2_CHAT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nHow many legs does a spider have?<|im_end|>\n"
    "<|im_start|>assistant\nA spider has eight legs. Insects, by contrast, have six.<|im_end|>\n"
    "<|im_start|>user\nAnd how many does a centipede have? Answer briefly.<|im_end|>\n"
    "<|im_start|>assistant\nDespite the name, a centipede does not have exactly one hundred legs; depending on "
    "the species it has between about thirty and three hundred and fifty, always an odd number of pairs.<|im_end|>\n"
)

GEMMA3_CHAT = (
    "<start_of_turn>user\nHow many legs does a spider have?<end_of_turn>\n"
    "<start_of_turn>model\nA spider has eight legs. Insects, by contrast, have six.<end_of_turn>\n"
    "<start_of_turn>user\nAnd how many does a centipede have? Answer briefly.<end_of_turn>\n"
    "<start_of_turn>model\nDespite the name, a centipede does not have exactly one hundred legs; depending on "
    "the species it has between about thirty and three hundred and fifty, always an odd number of pairs.<end_of_turn>\n"
)

QWEN25_CHAT = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nHow many legs does a spider have?<|im_end|>\n"
    "<|im_start|>assistant\nA spider has eight legs. Insects, by contrast, have six.<|im_end|>\n"
    "<|im_start|>user\nWrite a Python one-liner that counts the legs of 3 spiders and 2 ants.<|im_end|>\n"
    "<|im_start|>assistant\n```python\nlegs = 3 * 8 + 2 * 6  # 36\n```\nSpiders have eight legs and ants, being "
    "insects, have six, so the total is 36.<|im_end|>\n"
)

LONG_PROMPT = (
    "Chapter One\n\nThe lighthouse on the northern cape had been dark for eleven years when Ilse Varga arrived "
    "with a suitcase, a box of tools and a letter from the harbour office. "
)

MODELS = {
    "smollm2": {
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "name": "SmolLM2-135M-Instruct Q4_1",
        "bos": None,                      # add_bos_token = false
        "chat": SMOLLM2_CHAT,
        "out": "tests/fixtures/parity_smollm2.json",
    },
    "gemma3": {
        "file": "gemma-3-270m-q4_k_m.gguf",
        "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "name": "gemma-3-270m Q4_K_M",
        "bos": 2,                         # add_bos_token = true
        "chat": GEMMA3_CHAT,
        "out": "tests/fixtures/parity_gemma3.json",
    },
    "qwen25": {
        "file": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "name": "Qwen2.5-Coder-0.5B-Instruct Q4_K_M",
        "bos": None,                      # add_bos_token = false
        "chat": QWEN25_CHAT,
        "out": "tests/fixtures/parity_qwen25.json",
    },
}

MODEL_DIRS = [os.path.expanduser("~/.cache/hayloft/models"), "/tmp/models"]   # where `hayloft fetch` puts them, or /tmp


def default_path(key):
    for d in MODEL_DIRS:
        p = os.path.join(d, MODELS[key]["file"])
        if os.path.exists(p):
            return p
    return os.path.join(MODEL_DIRS[-1], MODELS[key]["file"])


SMOKE_PROMPT = "The capital of France is"
SMOKE_STEPS = 16


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Peer:
    """A llama.cpp context plus a batch decode that hands back the logits of every token in the batch."""

    def __init__(self, path, n_ctx):
        self.llm = llama_cpp.Llama(
            model_path=path, n_ctx=n_ctx, logits_all=True, n_threads=N_THREADS, n_threads_batch=N_THREADS,
            n_batch=N_BATCH, seed=0, verbose=False,
        )
        self.n_vocab = self.llm.n_vocab()
        self.vocab = L.llama_model_get_vocab(self.llm.model)

    def tokenize(self, text, bos):
        toks = self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        return ([bos] if bos is not None else []) + list(toks)

    def reset(self):
        self.llm.reset()
        L.llama_memory_clear(L.llama_get_memory(self.llm._ctx.ctx), True)

    def decode(self, tokens):
        """Like Llama.eval (same batches, same logits_all), but returns the logits instead of keeping an
        n_ctx x n_vocab array around (4.5 GB for gemma3's 262k vocabulary). Yields (position, logits[n, vocab])."""
        llm = self.llm
        for i in range(0, len(tokens), llm.n_batch):
            batch = list(tokens[i:i + llm.n_batch])
            n_past = llm.n_tokens
            llm._batch.set_batch(batch=batch, n_past=n_past, logits_all=True)
            llm._ctx.decode(llm._batch)
            llm.input_ids[n_past:n_past + len(batch)] = batch
            llm.n_tokens += len(batch)
            ptr = llm._ctx.get_logits()
            logits = np.ctypeslib.as_array(ptr, shape=(len(batch) * self.n_vocab,)).reshape(len(batch), self.n_vocab)
            yield n_past, logits.copy()

    def no_sample_mask(self):
        """Tokens never sampled for the long sequence: end-of-generation and control tokens."""
        mask = np.zeros(self.n_vocab, dtype=bool)
        for t in range(self.n_vocab):
            if L.llama_vocab_is_eog(self.vocab, t) or L.llama_vocab_is_control(self.vocab, t):
                mask[t] = True
        return mask


def sample_long(peer, prompt_tokens, total, args):
    """Seeded temperature / top-p sampling. Small models fall into loops within a few hundred tokens, which would
    make the long sequence trivially predictable, so a repetition penalty (llama.cpp's rule, over the last
    --rep-last tokens) and a ban on repeating any --no-repeat-ngram-gram seen before keep it varied."""
    rng = np.random.default_rng(args.seed)
    banned = peer.no_sample_mask()
    n = args.no_repeat_ngram
    seen = {}                                    # (n-1)-gram -> tokens that followed it
    peer.reset()
    toks = list(prompt_tokens)
    for i in range(len(toks) - n + 1):
        seen.setdefault(tuple(toks[i:i + n - 1]), set()).add(toks[i + n - 1])
    last = list(peer.decode(toks))[-1][1][-1]
    t0 = time.time()
    while len(toks) < total:
        x = last.astype(np.float64)
        recent = np.unique(np.array(toks[-args.rep_last:]))
        x[recent] = np.where(x[recent] > 0, x[recent] / args.rep_penalty, x[recent] * args.rep_penalty)
        x /= args.temp
        x[banned] = -np.inf
        ctx = tuple(toks[len(toks) - n + 1:])
        if ctx in seen:
            x[list(seen[ctx])] = -np.inf
        order = np.argsort(-x, kind="stable")
        p = np.exp(x[order] - x[order[0]])
        p /= p.sum()
        keep = int(np.searchsorted(np.cumsum(p), args.top_p) + 1)
        p = p[:keep] / p[:keep].sum()
        tok = int(order[rng.choice(keep, p=p)])
        seen.setdefault(ctx, set()).add(tok)
        toks.append(tok)
        last = list(peer.decode([tok]))[-1][1][-1]
        if len(toks) % 500 == 0:
            print(f"  sampled {len(toks)}/{total} tokens ({time.time() - t0:.0f}s)", file=sys.stderr)
    return toks


def greedy(peer, prompt_tokens, steps):
    peer.reset()
    out = []
    last = list(peer.decode(prompt_tokens))[-1][1][-1]
    for _ in range(steps):
        tok = int(np.argmax(last))
        out.append(tok)
        last = list(peer.decode([tok]))[-1][1][-1]
    return out


def stored_positions(n):
    if n <= ALL_POSITIONS_MAX:
        return list(range(n))
    return sorted(set(range(0, n, LONG_STRIDE)) | set(range(max(0, n - LONG_TAIL), n)))


def reference(peer, tokens):
    """Teacher-forced logits from a fresh context, for the stored positions only."""
    want = stored_positions(len(tokens))
    wanted = set(want)
    peer.reset()
    top_ids, top_logits, lse = [], [], []
    for start, logits in peer.decode(tokens):
        for r in range(logits.shape[0]):
            p = start + r
            if p not in wanted:
                continue
            row = logits[r].astype(np.float64)
            if not np.all(np.isfinite(row)):
                raise RuntimeError(f"non-finite logits at position {p}")
            m = row.max()
            lse.append(round(float(m + math.log(np.exp(row - m).sum())), 4))
            idx = np.argpartition(-row, TOP_K)[:TOP_K]
            idx = idx[np.lexsort((idx, -row[idx]))]          # logit descending, ties by id
            top_ids.append([int(i) for i in idx])
            top_logits.append([round(float(row[i]), 4) for i in idx])
    return want, top_ids, top_logits, lse


def build(key, path, args, command):
    cfg = MODELS[key]
    digest = sha256_file(path)
    if digest != cfg["sha256"]:
        sys.exit(f"{path}: sha256 {digest} is not the expected {cfg['sha256']}")
    bos = cfg["bos"]
    texts = [("prose", PROSE), ("numbers", NUMBERS), ("code", CODE), ("chat", cfg["chat"]), ("facts", FACTS)]

    peer = Peer(path, n_ctx=args.long_tokens + 256)
    seqs = [(name, text, peer.tokenize(text, bos)) for name, text in texts]
    for name, _, toks in seqs:
        print(f"[{key}] {name}: {len(toks)} tokens", file=sys.stderr)

    long_prompt = peer.tokenize(LONG_PROMPT, bos)
    print(f"[{key}] sampling the long sequence ({args.long_tokens} tokens, seed {args.seed}) ...", file=sys.stderr)
    long_toks = sample_long(peer, long_prompt, args.long_tokens, args)

    smoke_prompt = peer.tokenize(SMOKE_PROMPT, bos)
    smoke_out = greedy(peer, smoke_prompt, SMOKE_STEPS)

    entries = []
    for name, text, toks in seqs + [("long", None, long_toks)]:
        t0 = time.time()
        pos, ids, logits, lse = reference(peer, toks)
        print(f"[{key}] {name}: {len(toks)} tokens, {len(pos)} positions ({time.time() - t0:.1f}s)", file=sys.stderr)
        e = {"name": name}
        if text is not None:
            e["text"] = text
        else:
            e["source"] = {"prompt": LONG_PROMPT, "prompt_tokens": len(long_prompt), "sampler": "numpy",
                           "seed": args.seed, "temperature": args.temp, "top_p": args.top_p,
                           "repeat_penalty": args.rep_penalty, "repeat_last_n": args.rep_last,
                           "no_repeat_ngram": args.no_repeat_ngram,
                           "masked": "end-of-generation and control tokens",
                           "note": "continuation sampled from llama.cpp's logits by this script; token ids only"}
        e.update({"tokens": toks, "positions": pos, "top_ids": ids, "top_logits": logits, "logsumexp": lse})
        entries.append(e)

    fixture = {
        "format": "hayloft-parity-v1",
        "model": cfg["name"],
        "model_file": os.path.basename(path),
        "sha256": digest,
        "peer": "llama.cpp via llama-cpp-python",
        "llama_cpp_python": llama_cpp.__version__,
        "n_vocab": peer.n_vocab,
        "bos": bos,
        "n_threads": N_THREADS,
        "n_batch": N_BATCH,
        "n_ctx": args.long_tokens + 256,
        "top_k": TOP_K,
        "semantics": "logits at position p predict token p+1; top_ids/top_logits sorted by logit descending; "
                     "logsumexp over the full vocabulary; logits rounded to 4 decimals",
        "command": command,
        "smoke": {"prompt": SMOKE_PROMPT, "tokens": smoke_prompt, "greedy": smoke_out,
                  "greedy_text": peer.llm.detokenize(smoke_out).decode("utf-8", "replace")},
        "texts": entries,
    }
    out = os.path.join(REPO, cfg["out"])
    with open(out, "w") as f:
        json.dump(fixture, f, separators=(",", ":"), ensure_ascii=True)
        f.write("\n")
    print(f"[{key}] wrote {out} ({os.path.getsize(out)} bytes)", file=sys.stderr)
    print(f"[{key}] smoke: {SMOKE_PROMPT!r} -> {smoke_prompt} -> greedy {smoke_out} = "
          f"{fixture['smoke']['greedy_text']!r}", file=sys.stderr)
    del peer


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=sorted(MODELS), action="append", help="build only this model's fixture")
    ap.add_argument("--smollm2", default=os.environ.get("SMOLLM2_GGUF") or default_path("smollm2"))
    ap.add_argument("--gemma3", default=os.environ.get("GEMMA3_GGUF") or default_path("gemma3"))
    ap.add_argument("--qwen25", default=os.environ.get("QWEN25_GGUF") or default_path("qwen25"))
    ap.add_argument("--long-tokens", type=int, default=4224, help="length of the long sequence (>= 4200)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--temp", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--rep-penalty", type=float, default=1.1)
    ap.add_argument("--rep-last", type=int, default=128)
    ap.add_argument("--no-repeat-ngram", type=int, default=5)
    args = ap.parse_args()
    command = os.environ.get("PARITY_COMMAND") or shlex.join(
        ["python", os.path.relpath(os.path.abspath(__file__), REPO)] + sys.argv[1:])
    for key in args.only or list(MODELS):
        path = getattr(args, key)
        if not os.path.exists(path):
            sys.exit(f"no {path}: pass --{key} PATH.gguf")
        build(key, path, args, command)


if __name__ == "__main__":
    main()
