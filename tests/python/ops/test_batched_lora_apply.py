"""tf_lora.batched_lora_apply / batched_lora_matmul (TfLora>BatchedLoraApply): multi-adapter serving."""

import numpy as np
import pytest
import tensorflow as tf
from lora_test_util import RTOL, assert_close, random, run

import tf_lora

pytestmark = pytest.mark.usefixtures("on_each_device")


def _case(n, n_in, n_out, r, adapters, dtype, seed=0):
    rng = np.random.default_rng(seed)
    tensors = [
        random(s, dtype, rng)
        for s in [(n, n_out), (n, n_in), (adapters, n_in, r), (adapters, r, n_out), (adapters,)]
    ]
    # Unsorted ids, some rows without an adapter, and (with several adapters) one adapter unused.
    used = max(adapters - 1, 1)
    ids = rng.integers(-1, used, size=n).astype(np.int32)
    return tensors, ids


def _reference(y, x, a_stack, b_stack, scales, ids):
    out = y.copy()
    for i, k in enumerate(ids):
        if k >= 0:
            out[i] += scales[k] * (x[i] @ a_stack[k]) @ b_stack[k]
    return out


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("dtype", list(RTOL), ids=lambda d: d.name)
@pytest.mark.parametrize("shape", [(1, 3, 5, 2, 1), (13, 9, 17, 3, 4), (70, 20, 33, 16, 3)], ids=str)
def test_matches_numpy(shape, dtype, mode):
    tensors, ids = _case(*shape, dtype)
    (y, y_np), (x, x_np), (a, a_np), (b, b_np), (s, s_np) = tensors
    out = run(mode, tf_lora.batched_lora_apply, y, x, a, b, ids, s)
    assert out.dtype == dtype and out.shape == y.shape
    assert_close(out.numpy(), _reference(y_np, x_np, a_np, b_np, s_np, ids), dtype, terms=shape[1] * shape[3])


def test_equals_a_loop_of_single_applies():
    (y, _), (x, _), (a, _), (b, _), (s, _) = _case(37, 24, 40, 8, 5, tf.float32, seed=1)[0]
    ids = _case(37, 24, 40, 8, 5, tf.float32, seed=1)[1]
    batched = tf_lora.batched_lora_apply(y, x, a, b, ids, s).numpy()
    for i, k in enumerate(ids):
        row = y[i : i + 1]
        if k >= 0:
            row = tf_lora.lora_apply(row, x[i : i + 1], a[k], b[k], s[k])
        np.testing.assert_array_equal(batched[i], row.numpy()[0])


def test_empty_batch_and_no_adapter_rows():
    tensors, _ = _case(0, 4, 6, 2, 3, tf.float32)
    (y, _), (x, _), (a, _), (b, _), (s, _) = tensors
    assert tf_lora.batched_lora_apply(y, x, a, b, np.zeros([0], np.int32), s).shape == (0, 6)
    tensors, _ = _case(5, 4, 6, 2, 3, tf.float32)
    (y, y_np), (x, _), (a, _), (b, _), (s, _) = tensors
    out = tf_lora.batched_lora_apply(y, x, a, b, np.full([5], -1, np.int32), s)
    np.testing.assert_array_equal(out, y_np.astype(np.float32))


def test_gradient_numeric_float64():
    tensors, ids = _case(9, 5, 6, 2, 3, tf.float64, seed=2)
    args = [t for t, _ in tensors]

    def layer(y, x, a, b, s):
        return tf_lora.batched_lora_apply(y, x, a, b, ids, s)

    theoretical, numerical = tf.test.compute_gradient(layer, args)
    for t, n in zip(theoretical, numerical, strict=True):
        np.testing.assert_allclose(t, n, rtol=1e-7, atol=1e-7)


def test_second_order_gradient_numeric_float64():
    tensors, ids = _case(7, 4, 3, 2, 3, tf.float64, seed=8)
    y, x, a, b, s = (t for t, _ in tensors)

    def penalty(x, a, b, s):
        with tf.GradientTape() as tape:
            tape.watch([x, a, b, s])
            loss = tf.reduce_sum(tf.sin(tf_lora.batched_lora_apply(y, x, a, b, ids, s)))
        dx, da, db, ds = tape.gradient(loss, [x, a, b, s])
        return (
            tf.reduce_sum(dx * dx) + tf.reduce_sum(tf.cos(da)) + tf.reduce_sum(db**3) + tf.reduce_sum(ds**2)
        )

    theoretical, numerical = tf.test.compute_gradient(penalty, [x, a, b, s])
    for t, n in zip(theoretical, numerical, strict=True):
        # Central differences (step 1e-3) of cubic terms: good to about 1e-6; a wrong formula is O(1) off.
        np.testing.assert_allclose(t, n, rtol=1e-5, atol=1e-5)


def test_gradient_matches_per_adapter_single_gradients():
    tensors, ids = _case(40, 12, 10, 4, 4, tf.float64, seed=3)
    y, x, a, b, s = (t for t, _ in tensors)
    g = tf.constant(np.random.default_rng(4).uniform(-1, 1, (40, 10)))
    with tf.GradientTape() as tape:
        tape.watch([x, a, b, s])
        loss = tf.reduce_sum(tf_lora.batched_lora_apply(y, x, a, b, ids, s) * g)
    dx, da, db, ds = tape.gradient(loss, [x, a, b, s])
    for k in range(4):
        rows = np.flatnonzero(ids == k)
        xk, gk = tf.gather(x, rows), tf.gather(g, rows)
        with tf.GradientTape() as tape:
            tape.watch([xk, a, b, s])
            loss_k = tf.reduce_sum(tf_lora.lora_apply(tf.gather(y, rows), xk, a[k], b[k], s[k]) * gk)
        dxk, dak, dbk, dsk = tape.gradient(loss_k, [xk, a, b, s])
        np.testing.assert_allclose(tf.gather(dx, rows), dxk, rtol=1e-12, atol=1e-12)
        if rows.size:
            np.testing.assert_allclose(da[k], dak[k], rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(db[k], dbk[k], rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(ds[k], dsk[k], rtol=1e-12, atol=1e-12)
        else:  # an adapter no row uses gets zero gradients
            assert not np.any(da[k]) and not np.any(db[k]) and ds[k] == 0
    np.testing.assert_array_equal(tf.gather(dx, np.flatnonzero(ids < 0)), 0)


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_batched_matmul_with_batch_dims_and_bias(mode):
    rng = np.random.default_rng(5)
    x, x_np = random((2, 3, 8), tf.float32, rng)
    w, w_np = random((8, 5), tf.float32, rng)
    a, a_np = random((3, 8, 2), tf.float32, rng)
    b, b_np = random((3, 2, 5), tf.float32, rng)
    bias, bias_np = random((5,), tf.float32, rng)
    ids = np.array([[0, 2, -1], [1, 1, 0]], np.int32)
    scales = np.array([1.0, 0.5, 2.0], np.float32)
    out = run(mode, lambda *t: tf_lora.batched_lora_matmul(*t, bias=bias), x, w, a, b, ids, scales)
    assert out.shape == (2, 3, 5)
    flat_x = x_np.reshape(6, 8)
    expected = _reference(flat_x @ w_np + bias_np, flat_x, a_np, b_np, scales, ids.reshape(-1))
    np.testing.assert_allclose(out.numpy().reshape(6, 5), expected, rtol=1e-5, atol=1e-5)


# ---- Bad input ----


def test_id_out_of_range_names_first_bad_row():
    tensors, _ = _case(6, 4, 5, 2, 3, tf.float32)
    y, x, a, b, s = (t for t, _ in tensors)
    for bad in ([0, 1, 3, 2, 9, -1], [0, -2, 1, 1, 1, 1]):
        row = next(i for i, k in enumerate(bad) if k < -1 or k >= 3)
        pattern = rf"adapter_ids\[{row}\] = {bad[row]} is out of range \[-1, 3\)"
        with pytest.raises(tf.errors.InvalidArgumentError, match=pattern):
            tf_lora.batched_lora_apply(y, x, a, b, np.array(bad, np.int32), s)


@pytest.mark.parametrize(
    "counts,what",
    [
        ((3, 2, 3), r"a_stack.shape\[0\], b_stack.shape\[0\]"),
        ((3, 3, 4), r"a_stack.shape\[0\], scales.shape\[0\]"),
    ],
)
def test_adapter_count_mismatch(counts, what):
    n_a, n_b, n_s = counts
    args = [tf.zeros([4, 5]), tf.zeros([4, 6]), tf.zeros([n_a, 6, 2]), tf.zeros([n_b, 2, 5])]
    ids, scales = tf.zeros([4], tf.int32), tf.zeros([n_s])
    with pytest.raises(ValueError, match=what):
        tf.function(tf_lora.batched_lora_apply).get_concrete_function(*args, ids, scales)
    with pytest.raises(tf.errors.InvalidArgumentError, match="must hold the same number of adapters"):
        tf_lora.batched_lora_apply(*args, ids, scales)


def test_bad_shapes_and_dtypes():
    y, x = tf.zeros([4, 5]), tf.zeros([4, 6])
    a, b, s = tf.zeros([2, 6, 3]), tf.zeros([2, 3, 5]), tf.zeros([2])
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"expected x \[4, in\], adapter_ids \[4\]"):
        tf_lora.batched_lora_apply(y, x, a, b, tf.zeros([3], tf.int32), s)
    with pytest.raises(ValueError, match="must be rank 3"):
        tf.function(tf_lora.batched_lora_apply).get_concrete_function(
            y, x, a[0], b, tf.zeros([4], tf.int32), s
        )
    with pytest.raises((TypeError, tf.errors.InvalidArgumentError), match="float32|int32"):
        tf_lora.batched_lora_apply(y, x, a, b, tf.zeros([4], tf.float32), s)  # ids are integers (int64 too)


def test_matmul_takes_int64_ids_without_wrapping():
    x, w = tf.ones([2, 3]), tf.ones([3, 4])
    a, b, s = tf.ones([2, 3, 1]), tf.ones([2, 1, 4]), tf.ones([2])
    out = tf_lora.batched_lora_matmul(x, w, a, b, tf.constant([1, -1], tf.int64), s)
    np.testing.assert_allclose(out, [[6.0] * 4, [3.0] * 4])
    with pytest.raises(tf.errors.InvalidArgumentError, match="out of range"):
        tf_lora.batched_lora_matmul(x, w, a, b, tf.constant([2**32 + 1, 0], tf.int64), s)


@pytest.mark.parametrize("dtype", list(RTOL), ids=lambda d: d.name)
def test_outputs_each_row_s_x_at_a_for_the_gradient(dtype):
    from tf_lora.python.ops import gen_lora_ops

    tensors, ids = _case(13, 9, 17, 3, 4, dtype, seed=9)
    (y, _), (x, x_np), (a, a_np), (b, _), (s, _) = tensors
    out = gen_lora_ops.tf_lora_batched_lora_apply(y, x, a, b, ids, s)
    want = np.array([x_np[i] @ a_np[k] if k >= 0 else np.zeros(3) for i, k in enumerate(ids)])
    assert out.xa.dtype == dtype and out.xa.shape == (13, 3)
    assert_close(out.xa.numpy(), want, dtype, terms=9)


@pytest.mark.parametrize("dtype", list(RTOL), ids=lambda d: d.name)
def test_gradient_with_saved_x_at_a(dtype):
    """Given each row's x @ a (off by 0.5 on rows with an adapter, to see which one is used: float32 and
    float64 use it, half types compute it again) and a gradient for it, which joins dx and da_k; rows with
    id -1 take none of it."""
    from tf_lora.python.ops import gen_lora_ops

    tensors, ids = _case(40, 9, 17, 3, 4, dtype, seed=10)
    (g, g_np), (x, x_np), (a, a_np), (b, b_np), (s, s_np) = tensors
    rng = np.random.default_rng(11)
    grad_xa, grad_xa_np = random((40, 3), dtype, rng)
    true_xa = np.array([x_np[i] @ a_np[k] if k >= 0 else np.zeros(3) for i, k in enumerate(ids)])
    given = tf.cast(tf.constant(true_xa + 0.5 * (ids >= 0)[:, None]), dtype)
    dx, da, db, ds = gen_lora_ops.tf_lora_batched_lora_apply_grad(g, x, a, b, ids, s, [given], [grad_xa])
    used = given.numpy().astype(np.float64) if dtype in (tf.float32, tf.float64) else true_xa
    want = [np.zeros(x_np.shape), np.zeros(a_np.shape), np.zeros(b_np.shape), np.zeros(s_np.shape)]
    for i, k in enumerate(ids):
        if k >= 0:
            gbt = g_np[i] @ b_np[k].T
            u = s_np[k] * gbt + grad_xa_np[i]
            want[0][i] = u @ a_np[k].T
            want[1][k] += np.outer(x_np[i], u)
            want[2][k] += s_np[k] * np.outer(used[i], g_np[i])
            want[3][k] += used[i] @ gbt
    for got, expected, terms in zip(
        (dx, da, db, ds), want, (17 * 3, 40 * 17, 40 * 9, 40 * 3 * 26), strict=True
    ):
        assert_close(got.numpy(), expected, dtype, terms=terms)


def test_registered_gradient_reuses_the_forward_x_at_a():
    @tf.function
    def step(y, x, a, b, ids, s):
        with tf.GradientTape() as tape:
            tape.watch([x, a, b])
            out = tf_lora.batched_lora_apply(y, x, a, b, ids, s)
        return tape.gradient(out, [x, a, b], output_gradients=tf.ones_like(out))

    tensors, ids = _case(13, 9, 17, 3, 4, tf.float32, seed=12)
    args = [t for t, _ in tensors]
    graph = step.get_concrete_function(*args[:4], tf.constant(ids), args[4]).graph
    (grad_op,) = [op for op in graph.get_operations() if op.type == "TfLora>BatchedLoraApplyGrad"]
    (apply_op,) = [op for op in graph.get_operations() if op.type == "TfLora>BatchedLoraApply"]
    assert grad_op.get_attr("saved") == 1
    assert grad_op.inputs[6] is apply_op.outputs[1]
