#!/usr/bin/env python3
"""Reference dot products from llama.cpp itself, for src/kernels/tests.rs (`matches_llama_cpp_fixture`).

For each weight type: random *valid* blocks (random values, plausible f16 scales) and random activations; the
activations go through llama.cpp's own CPU quantizer for the type's vec_dot_type (`from_float`) and each output is
llama.cpp's own `vec_dot` (both taken from `ggml_get_type_traits_cpu`, called through ctypes).

Run with the python of a llama-cpp-python install (e.g. the peer venv from scripts/parity):
    ~/.cache/llamacpp-peer/venv/bin/python src/kernels/testdata/make_llamacpp_fixture.py
Output: src/kernels/testdata/llamacpp_dots.fixture (little endian): u32 case count, then per case
u32 ggml type, u64 rows, u64 cols, u64 n_tok, u64 weight bytes, the GGUF weight bytes, n_tok*cols f32 activations,
n_tok*rows f32 llama.cpp results.
The stored file was made with llama-cpp-python 0.3.36 (its bundled ggml CPU backend, AVX-512 VNNI build).
"""
import ctypes
import os
import struct
import numpy as np
L = os.environ.get('GGML_LIB_DIR') or os.path.expanduser('~/.cache/llamacpp-peer/venv/lib/python3.11/site-packages/llama_cpp/lib')
base = ctypes.CDLL(L + '/libggml-base.so', mode=ctypes.RTLD_GLOBAL)
cpu = ctypes.CDLL(L + '/libggml-cpu.so', mode=ctypes.RTLD_GLOBAL)
cpu.ggml_cpu_init()
class Traits(ctypes.Structure):
    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p), ("vec_dot_type", ctypes.c_int), ("nrows", ctypes.c_int64)]
cpu.ggml_get_type_traits_cpu.restype = ctypes.POINTER(Traits)
FROM = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
DOT = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
LAYOUT = {0:(1,4),1:(1,2),30:(1,2),2:(32,18),3:(32,20),6:(32,22),7:(32,24),8:(32,34),9:(32,36),12:(256,144),13:(256,176),14:(256,210),15:(256,292)}
rng = np.random.default_rng(1)
def h(v): return np.float16(v).tobytes()
def rand_tensor(ty, rows, cols):
    bs, bb = LAYOUT[ty]; out = bytearray()
    for _ in range(rows * cols // bs):
        b = bytearray(rng.integers(0, 256, bb, dtype=np.uint8).tobytes()); d = 0.004 + 0.02 * abs(rng.uniform(-1, 1))
        if ty == 0: b[:] = np.float32(rng.uniform(-.1, .1)).tobytes()
        elif ty == 1: b[:] = h(rng.uniform(-.1, .1))
        elif ty == 30: b[:] = (np.float32(rng.uniform(-.1, .1)).view(np.uint32) >> 16).astype(np.uint16).tobytes()
        elif ty in (2, 6, 8): b[0:2] = h(d if rng.integers(2) else -d)
        elif ty in (3, 7): b[0:2] = h(d); b[2:4] = h(-8 * d * (0.5 + abs(rng.uniform(-1, 1))))
        elif ty in (12, 13): b[0:2] = h(d / 40); b[2:4] = h(d / 60)
        elif ty == 14: b[208:210] = h(d / 100)
        out += b
    return bytes(out)
def act(n):
    v = (rng.uniform(-1,1,n) + rng.uniform(-1,1,n) + rng.uniform(-1,1,n)) * 0.8
    m = rng.integers(0, 61, n) == 0; v[m] *= 12
    return v.astype(np.float32)
def llama_mm(ty, rows, cols, w, x, n_tok):
    t = cpu.ggml_get_type_traits_cpu(ty).contents
    vt = t.vec_dot_type; tv = cpu.ggml_get_type_traits_cpu(vt).contents
    bs, bb = LAYOUT[vt]; row_q = cols // bs * bb
    wb = ctypes.create_string_buffer(w, len(w)); rb = len(w) // rows
    y = np.zeros((n_tok, rows), np.float32); s = ctypes.c_float()
    for ti in range(n_tok):
        xr = np.ascontiguousarray(x[ti * cols:(ti + 1) * cols])
        if vt == 0:
            q = ctypes.create_string_buffer(xr.tobytes(), len(xr.tobytes()))
        else:
            q = ctypes.create_string_buffer(row_q)
            FROM(tv.from_float)(xr.ctypes.data, ctypes.addressof(q), cols)
        for r in range(rows):
            DOT(t.vec_dot)(cols, ctypes.byref(s), 0, ctypes.addressof(wb) + r * rb, 0, ctypes.addressof(q), 0, 1)
            y[ti, r] = s.value
    return y
cases = []
for ty, rows, cols, n_tok in [(3, 20, 576, 3), (8, 20, 576, 3), (2, 17, 320, 3), (6, 17, 640, 2), (7, 17, 320, 2),
                              (12, 19, 512, 3), (13, 19, 512, 2), (14, 19, 1024, 2), (1, 20, 200, 2), (30, 20, 200, 2),
                              (0, 20, 200, 2)]:
    w = rand_tensor(ty, rows, cols)
    x = act(n_tok * cols)
    cases.append((ty, rows, cols, n_tok, w, x, llama_mm(ty, rows, cols, w, x, n_tok)))
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'llamacpp_dots.fixture')
with open(out, 'wb') as f:
    f.write(struct.pack('<I', len(cases)))
    for ty, rows, cols, n_tok, w, x, y in cases:
        f.write(struct.pack('<IQQQQ', ty, rows, cols, n_tok, len(w))); f.write(w); f.write(x.tobytes()); f.write(y.astype(np.float32).tobytes())
print('wrote', len(cases), 'cases to', out)
