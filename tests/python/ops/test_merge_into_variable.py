"""tf_lora.merge_into_variable / unmerge_from_variable (TfLora>ResourceLoraMerge): in-place hot swap."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from lora_test_util import RTOL, assert_close, random

import tf_lora

pytestmark = pytest.mark.usefixtures("on_each_device")


def _adapter(dtype, shape=(37, 45, 5), seed=0):
    rng = np.random.default_rng(seed)
    n_in, n_out, r = shape
    return random((n_in, n_out), dtype, rng), random((n_in, r), dtype, rng), random((r, n_out), dtype, rng)


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("dtype", list(RTOL), ids=lambda d: d.name)
def test_merge_matches_numpy(dtype, mode):
    (w, w_np), (a, a_np), (b, b_np) = _adapter(dtype)
    var = tf.Variable(w)
    merge = tf_lora.merge_into_variable if mode == "eager" else tf.function(tf_lora.merge_into_variable)
    merge(var, a, b, 1.5)
    assert_close(var.numpy(), w_np + 1.5 * a_np @ b_np, dtype)


@pytest.mark.parametrize("dtype", list(RTOL), ids=lambda d: d.name)
def test_merge_then_unmerge_restores_weight(dtype):
    (w, w_np), (a, _), (b, _) = _adapter(dtype, seed=1)
    var = tf.Variable(w)
    for _ in range(3):  # repeated hot swaps do not drift beyond rounding
        tf_lora.merge_into_variable(var, a, b, 0.75)
        tf_lora.unmerge_from_variable(var, a, b, 0.75)
    assert_close(var.numpy(), w_np, dtype, terms=16)


def test_function_with_several_merges_runs_them_in_order():
    (w, w_np), (a, a_np), (b, b_np) = _adapter(tf.float32, seed=2)
    var = tf.Variable(w)

    @tf.function
    def swap():
        tf_lora.merge_into_variable(var, a, b, 1.0)
        tf_lora.merge_into_variable(var, a, b, 2.0)
        return var.read_value()

    np.testing.assert_allclose(swap(), w_np + 3.0 * a_np @ b_np, rtol=1e-5, atol=1e-5)


def test_live_read_keeps_its_value():
    """A value read before the merge is a snapshot: the merge must not write through it."""
    (w, w_np), (a, a_np), (b, b_np) = _adapter(tf.float32, seed=3)
    var = tf.Variable(w)
    before = var.read_value()
    tf_lora.merge_into_variable(var, a, b, 1.0)
    np.testing.assert_array_equal(before.numpy(), w_np.astype(np.float32))
    np.testing.assert_allclose(var.numpy(), w_np + a_np @ b_np, rtol=1e-5, atol=1e-5)


@pytest.mark.cpu_only
def test_updates_the_variables_own_buffer():
    """With no read alive, the merge writes the variable's buffer: the same address before and after."""
    (w, _), (a, _), (b, _) = _adapter(tf.float32, seed=4)
    var = tf.Variable(w)
    # The new variable still shares its initial value's buffer with `w`, which this test holds: the first
    # merge must copy (the snapshot rule), after which the variable owns its buffer.
    tf_lora.merge_into_variable(var, a, b, 1.0)

    def address():
        value = var.read_value()  # eager reads share the variable's buffer
        return value._numpy().__array_interface__["data"][0]

    before = address()
    tf_lora.merge_into_variable(var, a, b, 1.0)
    assert address() == before


@pytest.mark.cpu_only
def test_allocates_no_weight_sized_tensor():
    """Peak CPU memory (TensorFlow's BFC allocator statistics) grows by far less than the weight's size."""
    script = textwrap.dedent(
        """
        import tensorflow as tf
        import tf_lora
        n, r = 2048, 16
        var = tf.Variable(tf.random.normal([n, n]))
        a, b = tf.random.normal([n, r]), tf.random.normal([r, n])
        tf_lora.merge_into_variable(var, a, b, 0.5)  # warm up
        tf.config.experimental.reset_memory_stats("CPU:0")
        base = tf.config.experimental.get_memory_info("CPU:0")["current"]
        tf_lora.merge_into_variable(var, a, b, 0.5)
        peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
        print("EXTRA_BYTES", peak - base, "WEIGHT_BYTES", n * n * 4)
        """
    )
    env = dict(os.environ, TF_CPU_ALLOCATOR_USE_BFC="true", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    fields = proc.stdout.split()
    extra, weight = (
        int(fields[fields.index("EXTRA_BYTES") + 1]),
        int(fields[fields.index("WEIGHT_BYTES") + 1]),
    )
    assert extra < weight / 8, (extra, weight)


# ---- Bad input: clear errors and the variable unchanged ----


def _assert_unchanged(var, expected):
    np.testing.assert_array_equal(var.numpy(), expected)


@pytest.mark.parametrize(
    "a_shape,b_shape,static_match",
    [
        ([36, 5], [5, 45], r"in \(var.shape\[0\], a.shape\[0\]\)"),
        ([37, 5], [4, 45], r"r \(a.shape\[1\], b.shape\[0\]\)"),
        ([37, 5], [5, 44], r"out \(var.shape\[1\], b.shape\[1\]\)"),
        ([37], [5, 45], "must be rank 2"),
    ],
)
def test_bad_shapes_leave_variable_unchanged(a_shape, b_shape, static_match):
    (w, _), _, _ = _adapter(tf.float32, seed=5)
    var = tf.Variable(w)
    original = var.numpy()
    args = tf.ones(a_shape), tf.ones(b_shape)
    # Eagerly the kernel checks, naming every shape it got.
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=r"ResourceLoraMerge: expected .*; got var \[37,45\]"
    ):
        tf_lora.merge_into_variable(var, *args, 1.0)
    _assert_unchanged(var, original)
    # Shapes known when a graph is built are checked then, with the variable's shape from its handle.
    with pytest.raises(ValueError, match=static_match):
        tf.function(lambda: tf_lora.merge_into_variable(var, *args, 1.0)).get_concrete_function()
    # Shapes known only at run time: the kernel again.
    unknown = tf.function(
        lambda a, b: tf_lora.merge_into_variable(var, a, b, 1.0),
        input_signature=[tf.TensorSpec(None), tf.TensorSpec(None)],
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match="ResourceLoraMerge: expected"):
        unknown(*args)
    _assert_unchanged(var, original)


def test_dtype_mismatch_leaves_variable_unchanged():
    var = tf.Variable(tf.ones([4, 3]))
    with pytest.raises(
        tf.errors.InvalidArgumentError, match="variable has dtype float but a, b and scale have dtype double"
    ):
        tf_lora.merge_into_variable(var, tf.ones([4, 2], tf.float64), tf.ones([2, 3], tf.float64), 1.0)
    with pytest.raises((TypeError, ValueError, tf.errors.InvalidArgumentError), match="float"):
        tf.function(tf_lora.merge_into_variable)(
            var, tf.ones([4, 2], tf.float64), tf.ones([2, 3], tf.float64), 1.0
        )
    _assert_unchanged(var, np.ones([4, 3], np.float32))


def test_not_a_variable():
    with pytest.raises(TypeError, match="expected a resource variable"):
        tf_lora.merge_into_variable(tf.ones([4, 3]), tf.ones([4, 2]), tf.ones([2, 3]), 1.0)
    with pytest.raises(TypeError, match="expected a resource variable"):
        tf_lora.unmerge_from_variable([[1.0]], tf.ones([1, 1]), tf.ones([1, 1]), 1.0)
    from tf_lora.python.ops import gen_lora_ops

    table = tf.lookup.experimental.MutableHashTable(tf.int64, tf.float32, default_value=0.0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="var must be the handle of a resource variable"):
        gen_lora_ops.tf_lora_resource_lora_merge(table.resource_handle, tf.ones([4, 2]), tf.ones([2, 3]), 1.0)
