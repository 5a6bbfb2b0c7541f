#!/usr/bin/env python3
"""llama.cpp's logits on tiny models, teacher-forced, for tests/tiny_parity.rs.

Usage: make_tiny_fixture.py OUT.json COMMAND MODEL.gguf...
For each model (its case name is the file's stem), evaluates a fixed sequence of 96 token ids in one batch on 1
thread and stores the logits at every 4th position and the last 8 (all of the vocabulary), with the model's SHA-256
so the test can tell when its writer changed.
"""
import hashlib
import json
import os
import sys

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "passive")
import llama_cpp  # noqa: E402
import llama_cpp.llama_cpp as L  # noqa: E402

# No repacked (extra) buffer types: their AMX kernels die with SIGILL on some of these machines.
_default_model_params = L.llama_model_default_params
L.llama_model_default_params = lambda: (lambda p: (setattr(p, "use_extra_bufts", False), p)[1])(_default_model_params())


def case(model):
    sha = hashlib.sha256(open(model, "rb").read()).hexdigest()
    llm = llama_cpp.Llama(model_path=model, n_ctx=128, n_batch=128, n_threads=1, logits_all=True,
                          verbose=False, flash_attn=False)
    n_vocab = llm.n_vocab()
    tokens = [(i * 37 + 11) % n_vocab for i in range(96)]
    llm.reset()
    llm.eval(tokens)
    logits = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    positions = sorted(set(range(0, len(tokens), 4)) | set(range(len(tokens) - 8, len(tokens))))
    print(f"{model}: {len(positions)} positions x {n_vocab} logits, sha256 {sha}")
    return {
        "model_sha256": sha,
        "n_vocab": n_vocab,
        "tokens": tokens,
        "positions": positions,
        "logits": [[round(float(x), 6) for x in logits[p]] for p in positions],
    }


def main():
    out, command, models = sys.argv[1], sys.argv[2], sys.argv[3:]
    fixture = {
        "about": "llama.cpp's logits on the tiny models tests/tiny_parity.rs writes",
        "command": command,
        "llama_cpp_python": llama_cpp.__version__,
        "cases": {os.path.splitext(os.path.basename(m))[0]: case(m) for m in models},
    }
    with open(out, "w") as f:
        json.dump(fixture, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
