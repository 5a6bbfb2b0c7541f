#!/usr/bin/env python3
"""A GGUF model's shape without its weights, for speed benchmarks on a machine the model cannot be copied to.

    bench/gguf-skeleton.py pack MODEL.gguf OUT.skel [--rows-bytes 16384]
    bench/gguf-skeleton.py expand OUT.skel MODEL-skeleton.gguf

`pack` keeps the GGUF header byte for byte (metadata, tokenizer, tensor table) and, of each tensor, only its first
rows (about --rows-bytes, whole rows, so every kept quantization block is a real one with real scales). `expand`
writes a GGUF of the original size in which every tensor is its kept rows repeated to its full length, at the
original offsets. Such a file has the model's architecture, tensor types, shapes and tokenizer, so both hayloft and
llama.cpp load it and run exactly the arithmetic they would run on the real one: use it for tok/s and thread scaling
only. Its outputs are meaningless (every row of a matrix repeats a few real rows).

A 98 MB SmolLM2 packs into about 5 MB, Qwen2.5-0.5B (491 MB) into about 10 MB (its tokenizer is most of that).
Standard library only.
"""
import argparse
import hashlib
import struct
import sys

MAGIC = b"HLSKEL1\n"

# ggml type id -> (elements per block, bytes per block)
GGML_TYPES = {
    0: (1, 4),      # F32
    1: (1, 2),      # F16
    2: (32, 18),    # Q4_0
    3: (32, 20),    # Q4_1
    6: (32, 22),    # Q5_0
    7: (32, 24),    # Q5_1
    8: (32, 34),    # Q8_0
    9: (32, 36),    # Q8_1
    10: (256, 84),  # Q2_K
    11: (256, 110), # Q3_K
    12: (256, 144), # Q4_K
    13: (256, 176), # Q5_K
    14: (256, 210), # Q6_K
    15: (256, 292), # Q8_K
    24: (1, 1),     # I8
    25: (1, 2),     # I16
    26: (1, 4),     # I32
    27: (1, 8),     # I64
    28: (1, 8),     # F64
    30: (1, 2),     # BF16
}

# GGUF metadata value types -> fixed byte size (strings and arrays handled apart)
SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


class Reader:
    def __init__(self, f):
        self.f = f

    def read(self, n):
        b = self.f.read(n)
        if len(b) != n:
            raise SystemExit(f"truncated GGUF: wanted {n} bytes at offset {self.f.tell()}")
        return b

    def u32(self):
        return struct.unpack("<I", self.read(4))[0]

    def u64(self):
        return struct.unpack("<Q", self.read(8))[0]

    def string(self):
        return self.read(self.u64())

    def skip_value(self, t):
        if t in SCALAR:
            self.read(SCALAR[t])
        elif t == 8:
            self.string()
        elif t == 9:
            et, n = self.u32(), self.u64()
            if et in SCALAR:
                self.read(SCALAR[et] * n)
            else:
                for _ in range(n):
                    self.skip_value(et)
        else:
            raise SystemExit(f"unknown GGUF metadata type {t}")


def parse(path):
    """Returns (header_bytes, [(name, offset_in_data, size_bytes, row_bytes)], alignment)."""
    with open(path, "rb") as f:
        r = Reader(f)
        if r.read(4) != b"GGUF":
            raise SystemExit(f"{path}: not a GGUF file")
        version = r.u32()
        if version not in (2, 3):
            raise SystemExit(f"{path}: GGUF version {version} is not supported")
        n_tensors, n_kv = r.u64(), r.u64()
        alignment = 32
        for _ in range(n_kv):
            key = r.string()
            t = r.u32()
            if key == b"general.alignment" and t == 4:
                alignment = r.u32()
            else:
                r.skip_value(t)
        tensors = []
        for _ in range(n_tensors):
            name = r.string().decode("utf-8", "replace")
            dims = [r.u64() for _ in range(r.u32())]
            t, off = r.u32(), r.u64()
            if t not in GGML_TYPES:
                raise SystemExit(f"{path}: tensor {name} has ggml type {t}, unknown to this script")
            blk, bsize = GGML_TYPES[t]
            if dims[0] % blk:
                raise SystemExit(f"{path}: tensor {name}: row of {dims[0]} is not whole blocks of {blk}")
            n_el = 1
            for d in dims:
                n_el *= d
            tensors.append((name, off, n_el // blk * bsize, dims[0] // blk * bsize))
        end = f.tell()
        start = (end + alignment - 1) // alignment * alignment
        f.seek(0)
        header = f.read(start)
    return header, tensors, alignment


def pack(src, dst, keep):
    header, tensors, _ = parse(src)
    total = max((off + size for _, off, size, _ in tensors), default=0)
    with open(src, "rb") as f, open(dst, "wb") as o:
        o.write(MAGIC)
        o.write(struct.pack("<QQQ", len(header), total, len(tensors)))
        o.write(header)
        for name, off, size, row in tensors:
            rows = max(1, keep // row)
            kept = min(size, rows * row)
            f.seek(len(header) + off)
            o.write(struct.pack("<QQQ", off, size, kept))
            o.write(f.read(kept))
    print(f"{src}: {len(tensors)} tensors, {len(header) + total} bytes -> {dst}")


def expand(src, dst):
    with open(src, "rb") as f, open(dst, "wb") as o:
        if f.read(len(MAGIC)) != MAGIC:
            raise SystemExit(f"{src}: not a skeleton made by this script")
        hlen, total, n = struct.unpack("<QQQ", f.read(24))
        o.write(f.read(hlen))
        base = hlen
        pos = 0
        for _ in range(n):
            off, size, kept = struct.unpack("<QQQ", f.read(24))
            rows = f.read(kept)
            if len(rows) != kept or off < pos:
                raise SystemExit(f"{src}: damaged skeleton")
            o.write(b"\0" * (off - pos))
            reps, rest = divmod(size, kept)
            o.write(rows * reps + rows[:rest])
            pos = off + size
        o.write(b"\0" * (total - pos))
        size = o.tell()
    assert size == base + total
    print(f"{dst}: {size} bytes ({n} tensors, each its first rows repeated: for speed only)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--rows-bytes", type=int, default=16384)
    e = sub.add_parser("expand")
    e.add_argument("skeleton")
    e.add_argument("out")
    a = ap.parse_args()
    if a.cmd == "pack":
        pack(a.model, a.out, a.rows_bytes)
    else:
        expand(a.skeleton, a.out)


if __name__ == "__main__":
    sys.exit(main())
