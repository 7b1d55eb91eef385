"""Helpers shared by the LoRA op tests: inputs exact in every dtype, and per-dtype tolerances."""

import numpy as np
import tensorflow as tf

# Relative tolerances: float32/float64 sums, and one rounding of the float32 result for half types.
RTOL = {
    tf.float32: 1e-5,
    tf.float64: 1e-12,
    tf.float16: 2e-3,
    tf.bfloat16: 1e-2,
}


def random(shape, dtype, rng):
    """Values exactly representable in `dtype`, as (tensor, float64 numpy array)."""
    tensor = tf.constant(rng.uniform(-1, 1, size=shape), dtype=dtype)
    return tensor, tensor.numpy().astype(np.float64)


def assert_close(got, expected, dtype, terms=1):
    """|got - expected| within RTOL[dtype] of (1 + |expected| + the typical size of `terms` summed terms)."""
    got = np.asarray(got, dtype=np.float64)
    scale = 1 + np.abs(expected) + 0.05 * np.sqrt(terms)
    np.testing.assert_array_less(np.abs(got - expected) / scale, RTOL[dtype])


def run(mode, fn, *args):
    """fn(*args) eagerly or inside tf.function."""
    return fn(*args) if mode == "eager" else tf.function(fn)(*args)
