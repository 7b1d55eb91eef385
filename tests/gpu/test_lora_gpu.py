"""The LoRA GPU kernels (core/kernels/lora_gpu.cu.cc) against a float64 numpy reference, with no TensorFlow.

Two backends run the same tests:
- `emulation` (CI, any machine): the kernels compiled as C++ for gpu_portability.h's CPU emulation (blocks
  of threads meeting at barriers), on numpy buffers: it checks the index arithmetic, tiling, grouping and
  edge cases, on smaller shapes.
- `cuda` (tests/gpu/run.sh on a GPU machine): the kernels built by nvcc, on PyTorch CUDA buffers, over the
  full shape sweep.
The backend and library come from TF_LORA_GPU_BACKEND / TF_LORA_GPU_LIB (default: the emulation library
Bazel builds, bazel-bin/tests/gpu/liblora_gpu_emulation.so).
"""

import os
import pathlib

import lora_gpu_lib
import numpy as np
import pytest
from lora_gpu_lib import DTYPES, decode, encode

REPO = pathlib.Path(__file__).resolve().parents[2]
BACKEND = os.environ.get("TF_LORA_GPU_BACKEND", "emulation")
LIB = os.environ.get("TF_LORA_GPU_LIB", str(REPO / "bazel-bin/tests/gpu/liblora_gpu_emulation.so"))
FULL = BACKEND == "cuda"
# One rounding of a float32 result, plus float32 sums, relative to the output's size.
TOLERANCE = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 1.6e-2}


def _lib():
    if not os.path.exists(LIB):
        pytest.fail(f"{LIB} is missing: `bazel build //tests/gpu:liblora_gpu_emulation.so` (make test does)")
    return lora_gpu_lib.load(LIB)


# -- backends: put numpy storage on the device, get it back -------------------------------------------------


class Emulation:
    def put(self, array):
        return np.ascontiguousarray(array).copy()

    def empty(self, nbytes):
        return np.zeros(max(int(nbytes), 16) + 16, np.uint8)  # room to align

    def ptr(self, buf):
        address = buf.ctypes.data
        return address + (-address % 16) if buf.dtype == np.uint8 else address

    def get(self, buf, like):
        return buf.copy()

    stream = None

    def sync(self):
        pass


class Cuda:
    def __init__(self):
        import torch

        self.torch = torch
        self.stream = torch.cuda.current_stream().cuda_stream

    def put(self, array):
        array = np.ascontiguousarray(array)
        raw = self.torch.from_numpy(array.view(np.uint8).reshape(-1).copy())
        return raw.cuda()

    def empty(self, nbytes):
        return self.torch.zeros(max(int(nbytes), 16), dtype=self.torch.uint8, device="cuda")

    def ptr(self, buf):
        return buf.data_ptr()

    def get(self, buf, like):
        self.sync()
        return buf.cpu().numpy().view(like.dtype).reshape(like.shape)

    def sync(self):
        self.torch.cuda.synchronize()


@pytest.fixture(scope="module")
def gpu():
    lib = _lib()
    return lib, Cuda() if BACKEND == "cuda" else Emulation()


def _random(rng, shape, dtype, scale=1.0):
    return encode(rng.standard_normal(shape).astype(np.float32) * scale, dtype)


def _check(got, want, dtype, what):
    size = max(1.0, float(np.abs(want).max())) if want.size else 1.0
    err = float(np.abs(got - want).max()) / size if want.size else 0.0
    assert err <= TOLERANCE[dtype], f"{what}: max error {err:.3g} (relative to {size:.3g})"


# -- merge ------------------------------------------------------------------------------------------------

MERGE_SHAPES = [(1, 1, 1), (7, 9, 3), (33, 65, 16), (64, 128, 8), (70, 40, 33), (5, 3, 0), (0, 4, 2)]
if FULL:
    MERGE_SHAPES += [(4096, 4096, 16), (4096, 4096, 64), (1000, 1001, 128), (4097, 257, 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", MERGE_SHAPES, ids=str)
@pytest.mark.parametrize("in_place", [False, True])
def test_merge(gpu, dtype, shape, in_place):
    lib, dev = gpu
    d_in, d_out, r = shape
    rng = np.random.default_rng(d_in * 7 + d_out + r)
    w, a, b = (_random(rng, s, dtype) for s in [(d_in, d_out), (d_in, r), (r, d_out)])
    bw, ba, bb = dev.put(w), dev.put(a), dev.put(b)
    result = bw if in_place else dev.put(np.zeros_like(w))
    rc = lib.tfl_lora_merge(
        DTYPES[dtype],
        dev.stream,
        d_in,
        d_out,
        r,
        dev.ptr(bw),
        dev.ptr(ba),
        dev.ptr(bb),
        0.75,
        dev.ptr(result),
    )
    assert rc == 0
    want = decode(w, dtype) + 0.75 * decode(a, dtype) @ decode(b, dtype)
    _check(decode(dev.get(result, w), dtype), want, dtype, f"merge {dtype} {shape}")


# -- apply ------------------------------------------------------------------------------------------------

APPLY_SHAPES = [
    (1, 9, 7, 1),
    (7, 33, 65, 8),
    (40, 64, 128, 16),
    (33, 300, 20, 64),
    (3, 5, 6, 0),
    (0, 4, 4, 2),
]
APPLY_SHAPES += [(2, 0, 5, 3), (4, 6, 0, 3), (300, 70, 9, 128)]
if FULL:
    APPLY_SHAPES += [
        (4096, 4096, 4096, 16),
        (4097, 1000, 1001, 64),
        (1, 4096, 4096, 16),
        (7, 4096, 11008, 128),
    ]


def _apply_reference(y, x, a, b, scale, dtype):
    return decode(y, dtype) + scale * (decode(x, dtype) @ decode(a, dtype)) @ decode(b, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", APPLY_SHAPES, ids=str)
@pytest.mark.parametrize("in_place", [False, True])
def test_apply(gpu, dtype, shape, in_place):
    lib, dev = gpu
    n, d_in, d_out, r = shape
    rng = np.random.default_rng(n + d_in * 3 + d_out * 5 + r)
    y, x = _random(rng, (n, d_out), dtype), _random(rng, (n, d_in), dtype)
    a, b = _random(rng, (d_in, r), dtype, 0.3), _random(rng, (r, d_out), dtype, 0.3)
    by, bx, ba, bb = dev.put(y), dev.put(x), dev.put(a), dev.put(b)
    out = by if in_place else dev.put(np.zeros_like(y))
    xa_like = np.full((n, r), 7, y.dtype)  # garbage to overwrite
    xa = dev.put(xa_like)
    work = dev.empty(lib.tfl_lora_apply_workspace(n, d_in, r))
    rc = lib.tfl_lora_apply(
        DTYPES[dtype],
        dev.stream,
        n,
        d_in,
        d_out,
        r,
        *map(dev.ptr, (by, bx, ba, bb)),
        1.5,
        dev.ptr(out),
        dev.ptr(xa),
        dev.ptr(work),
    )
    assert rc == 0
    want = _apply_reference(y, x, a, b, 1.5, dtype)
    _check(decode(dev.get(out, y), dtype), want, dtype, f"apply {dtype} {shape}")
    want_xa = decode(x, dtype) @ decode(a, dtype)
    _check(decode(dev.get(xa, xa_like), dtype), want_xa, dtype, f"apply's xa {dtype} {shape}")


# -- batched apply ----------------------------------------------------------------------------------------

# (rows, in, out, r, adapters): few rows take one tile per row, more are grouped by adapter.
BATCHED_SHAPES = [(1, 9, 7, 4, 1), (7, 33, 65, 8, 8), (64, 40, 24, 16, 64), (65, 40, 24, 16, 8)]
BATCHED_SHAPES += [
    (300, 70, 130, 16, 8),
    (200, 16, 8, 128, 3),
    (5, 4, 4, 2, 0),
    (9, 6, 0, 3, 2),
    (70, 6, 0, 3, 2),
]
if FULL:
    BATCHED_SHAPES += [(4097, 1000, 1001, 16, 64), (32, 4096, 4096, 16, 32), (4096, 4096, 4096, 64, 8)]


def _batched(gpu, dtype, shape, ids, in_place=False):
    lib, dev = gpu
    n, d_in, d_out, r, k = shape
    rng = np.random.default_rng(n * 11 + d_in + d_out * 3 + r + k)
    y, x = _random(rng, (n, d_out), dtype), _random(rng, (n, d_in), dtype)
    a, b = _random(rng, (k, d_in, r), dtype, 0.3), _random(rng, (k, r, d_out), dtype, 0.3)
    scales = encode(rng.uniform(-2, 2, k), dtype)
    bufs = [dev.put(v) for v in (y, x, a, b)]
    b_ids, b_scales = dev.put(ids.astype(np.int32)), dev.put(scales)
    out = bufs[0] if in_place else dev.put(np.zeros_like(y))
    xa_like = np.full((n, r), 7, y.dtype)  # garbage to overwrite
    b_xa = dev.put(xa_like)
    bad = dev.put(np.zeros(4, np.int32))
    work = dev.empty(lib.tfl_batched_lora_apply_workspace(n, d_in, r, k))
    rc = lib.tfl_batched_lora_apply(
        DTYPES[dtype],
        dev.stream,
        n,
        d_in,
        d_out,
        r,
        k,
        *map(dev.ptr, bufs),
        dev.ptr(b_ids),
        dev.ptr(b_scales),
        dev.ptr(out),
        dev.ptr(b_xa),
        dev.ptr(work),
        dev.ptr(bad),
    )
    assert rc == 0
    want, want_xa = decode(y, dtype).copy(), np.zeros((n, r))
    for i, adapter in enumerate(ids):
        if 0 <= adapter < k:
            want_xa[i] = decode(x[i], dtype) @ decode(a[adapter], dtype)
            want[i] += decode(scales, dtype)[adapter] * want_xa[i] @ decode(b[adapter], dtype)
    got = decode(dev.get(out, y), dtype)
    _check(decode(dev.get(b_xa, xa_like), dtype), want_xa, dtype, f"batched xa {dtype} {shape}")
    bad_row = int(dev.get(bad, np.zeros(4, np.int32))[0])
    return got, want, bad_row


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", BATCHED_SHAPES, ids=str)
def test_batched_apply_unsorted_ids_with_minus_one(gpu, dtype, shape):
    n, k = shape[0], shape[4]
    ids = np.random.default_rng(n + k).integers(-1, k, n) if k else np.full(n, -1)
    got, want, bad_row = _batched(gpu, dtype, shape, ids)
    _check(got, want, dtype, f"batched {dtype} {shape}")
    assert bad_row == gpu[0].tfl_no_bad_row()


@pytest.mark.parametrize("shape", [(7, 33, 65, 8, 4), (300, 40, 24, 16, 4)], ids=str)
def test_batched_apply_in_place(gpu, shape):
    ids = np.random.default_rng(1).integers(-1, shape[4], shape[0])
    got, want, _ = _batched(gpu, "float32", shape, ids, in_place=True)
    _check(got, want, "float32", f"batched in place {shape}")


@pytest.mark.parametrize("shape", [(7, 9, 5, 2, 3), (300, 9, 5, 2, 3)], ids=["per-row", "grouped"])
def test_batched_apply_bad_ids_are_reported_never_read(gpu, shape):
    n = shape[0]
    ids = np.random.default_rng(2).integers(-1, 3, n)
    ids[4], ids[n - 1] = 3, -7  # past the last adapter; below -1
    got, want, bad_row = _batched(gpu, "float32", shape, ids)
    assert bad_row == 4  # the first bad row
    _check(got, want, "float32", "rows with good ids")  # rows 4 and n - 1 stay as they were (reference: y)


def test_batched_apply_with_nothing_to_add_still_checks_ids(gpu):
    got, want, bad_row = _batched(gpu, "float32", (4, 3, 2, 0, 2), np.array([0, 1, 2, -1]))
    assert bad_row == 2
    _check(got, want, "float32", "r = 0")


# -- apply's gradients ---------------------------------------------------------------------------------------

GRAD_SHAPES = [(1, 9, 7, 1), (7, 33, 65, 8), (40, 64, 128, 16), (130, 70, 9, 64), (33, 20, 300, 3)]
GRAD_SHAPES += [(0, 4, 5, 2), (3, 0, 5, 2), (3, 4, 5, 0), (3, 4, 0, 2)]
if FULL:
    GRAD_SHAPES += [(4096, 4096, 4096, 16), (4097, 1000, 1001, 64), (2, 4096, 11008, 128)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=str)
@pytest.mark.parametrize("saved", [False, True], ids=["recomputed", "saved"])
def test_apply_grad(gpu, dtype, shape, saved):
    """saved: with LoraApply's x @ a and a gradient for it. The given x @ a is off by a known amount: float32
    must use it (db, dscale show the offset), half types must compute x @ a again in float32."""
    lib, dev = gpu
    n, d_in, d_out, r = shape
    rng = np.random.default_rng(n * 5 + d_in + d_out * 7 + r)
    g, x = _random(rng, (n, d_out), dtype), _random(rng, (n, d_in), dtype)
    a, b = _random(rng, (d_in, r), dtype, 0.3), _random(rng, (r, d_out), dtype, 0.3)
    g64, x64, a64, b64 = (decode(v, dtype) for v in (g, x, a, b))
    xa, gbt = x64 @ a64, g64 @ b64.T
    grad_xa = _random(rng, (n, r), dtype) if saved else None
    given_xa = encode(xa + (0.5 if d_in else 0.0), dtype)  # in = 0: x @ a is zero, known without it
    outs = [np.full(s, 7, g.dtype) for s in [(n, d_in), (d_in, r), (r, d_out), (1,)]]  # garbage to overwrite
    bufs = [dev.put(v) for v in (g, x, a, b)]
    out_bufs = [dev.put(v) for v in outs]
    saved_bufs = [dev.put(given_xa), dev.put(grad_xa)] if saved else []
    work = dev.empty(lib.tfl_lora_apply_grad_workspace(n, d_in, d_out, r))
    rc = lib.tfl_lora_apply_grad(
        DTYPES[dtype],
        dev.stream,
        n,
        d_in,
        d_out,
        r,
        *[dev.ptr(v) for v in bufs],
        0.75,
        *[dev.ptr(v) for v in out_bufs],
        dev.ptr(work),
        *([dev.ptr(v) for v in saved_bufs] if saved else [None, None]),
    )
    assert rc == 0
    u = 0.75 * gbt + (decode(grad_xa, dtype) if saved else 0.0)
    if saved and dtype == "float32":
        xa = decode(given_xa, dtype)
    wants = [u @ a64.T, x64.T @ u, 0.75 * xa.T @ g64, np.array([np.sum(xa * gbt)])]
    for name, buf, like, want in zip(["dx", "da", "db", "dscale"], out_bufs, outs, wants, strict=True):
        _check(decode(dev.get(buf, like), dtype), want, dtype, f"{name} {dtype} {shape}")


# -- batched apply's gradients -------------------------------------------------------------------------------

BATCHED_GRAD_SHAPES = [(1, 9, 7, 4, 1), (7, 33, 65, 8, 8), (70, 40, 24, 16, 3), (300, 70, 130, 16, 8)]
BATCHED_GRAD_SHAPES += [(200, 16, 8, 128, 3), (5, 4, 4, 2, 0), (0, 4, 4, 2, 2), (6, 4, 4, 0, 2)]
BATCHED_GRAD_SHAPES += [(9, 6, 0, 3, 2), (70, 6, 0, 3, 2)]  # out = 0: only grad_xa is left
if FULL:
    BATCHED_GRAD_SHAPES += [(4097, 1000, 1001, 16, 64), (4096, 4096, 4096, 64, 8)]


def _batched_grad(gpu, dtype, shape, ids, saved=False):
    """saved: with BatchedLoraApply's x @ a (off by 0.5 on rows with an adapter: float32 must use it, half
    types recompute it) and a gradient for it."""
    lib, dev = gpu
    n, d_in, d_out, r, k = shape
    rng = np.random.default_rng(n * 3 + d_in + d_out * 11 + r + k)
    g, x = _random(rng, (n, d_out), dtype), _random(rng, (n, d_in), dtype)
    a, b = _random(rng, (k, d_in, r), dtype, 0.3), _random(rng, (k, r, d_out), dtype, 0.3)
    scales = encode(rng.uniform(-2, 2, k), dtype)
    g64, x64, a64, b64, s64 = (decode(v, dtype) for v in (g, x, a, b, scales))
    has = (ids >= 0) & (ids < k)
    true_xa = np.zeros((n, r))
    for i in np.flatnonzero(has):
        true_xa[i] = x64[i] @ a64[ids[i]]
    given_xa = encode(true_xa + np.where(has[:, None] & (d_in > 0), 0.5, 0.0), dtype)
    grad_xa = _random(rng, (n, r), dtype)
    used_xa = decode(given_xa, dtype) if saved and dtype == "float32" else true_xa
    outs = [np.full(s, 7, g.dtype) for s in [(n, d_in), (k, d_in, r), (k, r, d_out), (k,)]]  # to overwrite
    bufs = [dev.put(v) for v in (g, x, a, b)]
    b_ids, b_scales, bad = dev.put(ids.astype(np.int32)), dev.put(scales), dev.put(np.zeros(4, np.int32))
    out_bufs = [dev.put(v) for v in outs]
    saved_bufs = [dev.put(given_xa), dev.put(grad_xa)]  # alive through the call
    work = dev.empty(lib.tfl_batched_lora_apply_grad_workspace(n, d_in, d_out, r, k))
    rc = lib.tfl_batched_lora_apply_grad(
        DTYPES[dtype],
        dev.stream,
        n,
        d_in,
        d_out,
        r,
        k,
        *[dev.ptr(v) for v in bufs],
        dev.ptr(b_ids),
        dev.ptr(b_scales),
        *[dev.ptr(v) for v in out_bufs],
        dev.ptr(work),
        dev.ptr(bad),
        *([dev.ptr(v) for v in saved_bufs] if saved else [None, None]),
    )
    assert rc == 0
    want = [np.zeros(o.shape) for o in outs]
    for i, adapter in enumerate(ids):
        if 0 <= adapter < k:
            xa, gbt = used_xa[i], g64[i] @ b64[adapter].T
            u = s64[adapter] * gbt + (decode(grad_xa[i], dtype) if saved else 0.0)
            want[0][i] = u @ a64[adapter].T
            want[1][adapter] += np.outer(x64[i], u)
            want[2][adapter] += s64[adapter] * np.outer(xa, g64[i])
            want[3][adapter] += xa @ gbt
    got = [decode(dev.get(buf, like), dtype) for buf, like in zip(out_bufs, outs, strict=True)]
    return got, want, int(dev.get(bad, np.zeros(4, np.int32))[0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", BATCHED_GRAD_SHAPES, ids=str)
@pytest.mark.parametrize("saved", [False, True], ids=["recomputed", "saved"])
def test_batched_apply_grad(gpu, dtype, shape, saved):
    n, k = shape[0], shape[4]
    ids = np.random.default_rng(n + 7 * k).integers(-1, k, n) if k else np.full(n, -1)
    got, want, bad_row = _batched_grad(gpu, dtype, shape, ids, saved)
    for name, g, w in zip(["dx", "da", "db", "dscales"], got, want, strict=True):
        _check(g, w, dtype, f"{name} {dtype} {shape}")
    assert bad_row == gpu[0].tfl_no_bad_row()


def test_batched_apply_grad_splits_more_adapters_than_a_grid_holds(gpu):
    """More adapters than gridDim.y allows (65535 on CUDA; lowered to 2 here so that the test stays small)
    go in several launches: the launch failed before."""
    gpu[0].tfl_set_max_grid_yz(2)
    try:
        ids = np.random.default_rng(4).integers(-1, 5, 60)
        got, want, bad_row = _batched_grad(gpu, "float32", (60, 9, 70, 3, 5), ids)
    finally:
        gpu[0].tfl_set_max_grid_yz(65535)
    for name, g, w in zip(["dx", "da", "db", "dscales"], got, want, strict=True):
        _check(g, w, "float32", name)
    assert bad_row == gpu[0].tfl_no_bad_row()


def test_batched_apply_grad_bad_ids_are_reported_never_read(gpu):
    ids = np.random.default_rng(3).integers(-1, 3, 90)
    ids[5], ids[60] = 3, -9
    got, want, bad_row = _batched_grad(gpu, "float32", (90, 9, 5, 2, 3), ids)
    assert bad_row == 5
    for name, g, w in zip(["dx", "da", "db", "dscales"], got, want, strict=True):
        _check(g, w, "float32", name)  # the bad rows count as rows without an adapter
