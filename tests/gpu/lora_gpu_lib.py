"""ctypes bindings of tests/gpu/harness.cu.cc, and the dtypes as numpy storage: shared by the tests and the
benchmark (both run without TensorFlow)."""

import ctypes

import numpy as np

DTYPES = {"float32": 0, "float16": 1, "bfloat16": 2}


def load(path):
    lib = ctypes.CDLL(path)
    i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
    lib.tfl_lora_merge.argtypes = [ctypes.c_int, ptr, i64, i64, i64, ptr, ptr, ptr, f32, ptr]
    lib.tfl_set_max_grid_yz.argtypes = [i64]
    lib.tfl_lora_apply_workspace.argtypes = [i64, i64, i64]
    lib.tfl_lora_apply_workspace.restype = ctypes.c_size_t
    lib.tfl_lora_apply.argtypes = [
        ctypes.c_int,
        ptr,
        i64,
        i64,
        i64,
        i64,
        ptr,
        ptr,
        ptr,
        ptr,
        f32,
        ptr,
        ptr,
        ptr,
    ]
    lib.tfl_lora_apply_grad_workspace.argtypes = [i64, i64, i64, i64]
    lib.tfl_lora_apply_grad_workspace.restype = ctypes.c_size_t
    lib.tfl_lora_apply_grad.argtypes = [ctypes.c_int, ptr, i64, i64, i64, i64, *[ptr] * 4, f32, *[ptr] * 7]
    lib.tfl_batched_lora_apply_workspace.argtypes = [i64, i64, i64, i64]
    lib.tfl_batched_lora_apply_workspace.restype = ctypes.c_size_t
    lib.tfl_batched_lora_apply.argtypes = [ctypes.c_int, ptr, *[i64] * 5, *[ptr] * 10]
    lib.tfl_batched_lora_apply_grad_workspace.argtypes = [i64] * 5
    lib.tfl_batched_lora_apply_grad_workspace.restype = ctypes.c_size_t
    lib.tfl_batched_lora_apply_grad.argtypes = [ctypes.c_int, ptr, *[i64] * 5, *[ptr] * 14]
    return lib


def encode(values, dtype):
    """float values -> the dtype's storage (bfloat16 as uint16 bits, rounded to nearest even)."""
    values = np.asarray(values, np.float32)
    if dtype == "float32":
        return values.copy()
    if dtype == "float16":
        return values.astype(np.float16)
    bits = values.view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def decode(stored, dtype):
    if dtype == "bfloat16":
        return (stored.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return stored.astype(np.float64)
