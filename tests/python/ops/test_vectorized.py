"""The LoRA ops under TensorFlow's vectorization (pfor): tf.vectorized_map, GradientTape.jacobian and the
per-example gradients of DP-SGD, against per-iteration numpy references. `fallback_to_while_loop=False`
makes a missing converter an error, so these fail without tf_lora's converters."""

import numpy as np
import pytest
import tensorflow as tf

import tf_lora

pytestmark = pytest.mark.usefixtures("on_each_device")

TOL = {tf.float32: 1e-5, tf.float64: 1e-12, tf.bfloat16: 2e-2, tf.float16: 2e-3}


def _np(t):
    return np.asarray(tf.cast(t, tf.float64))


def _vmap(fn, elems):
    return tf.function(lambda: tf.vectorized_map(fn, elems, fallback_to_while_loop=False))()


def _close(got, want, dtype, scale=None):
    tol = TOL[dtype]
    size = float(np.abs(want).max()) if scale is None else scale
    np.testing.assert_allclose(_np(got), want, rtol=tol, atol=tol * max(size, 1.0))


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64, tf.bfloat16])
@pytest.mark.parametrize("rows", [5, 1, 0])
def test_per_example_gradients_of_lora_apply(dtype, rows):
    # DP-SGD's per-example gradients: the adapter is shared, each example's gradient is its own.
    rng = np.random.default_rng(0)
    examples, d_in, d_out, rank = 6, 7, 9, 3
    x = rng.standard_normal((examples, rows, d_in))
    c = rng.standard_normal((examples, rows, d_out))
    a, b = rng.standard_normal((d_in, rank)), rng.standard_normal((rank, d_out))
    w = rng.standard_normal((d_in, d_out))
    av, bv, sv = (tf.Variable(tf.cast(v, dtype)) for v in (a, b, 0.5))

    def per_example(elems):
        xi, ci = elems
        with tf.GradientTape() as tape:
            y = tf_lora.lora_apply(tf.matmul(xi, tf.cast(w, dtype)), xi, av, bv, sv)
            loss_dtype = tf.float64 if dtype == tf.float64 else tf.float32
            loss = tf.reduce_sum(tf.cast(y, loss_dtype) * tf.cast(ci, loss_dtype))
        return tape.gradient(loss, [av, bv, sv])

    da, db, ds = _vmap(per_example, (tf.cast(x, dtype), tf.cast(c, dtype)))
    assert da.shape == (examples, d_in, rank) and ds.shape == (examples,)
    x, c = _np(tf.cast(x, dtype)), _np(tf.cast(c, dtype))  # the inputs as the op saw them
    a, b = _np(av), _np(bv)
    want_da = 0.5 * np.einsum("lni,lno,ro->lir", x, c, b)
    want_db = 0.5 * np.einsum("lni,ir,lno->lro", x, a, c)
    want_ds = np.einsum("lni,ir,ro,lno->l", x, a, b, c)
    for got, want in ((da, want_da), (db, want_db), (ds, want_ds)):
        _close(got, want, dtype, scale=float(np.abs(want).max(initial=1.0)))


@pytest.mark.parametrize("dtype", [tf.float32, tf.float16])
def test_an_adapter_per_iteration(dtype):
    # vectorized_map over adapters as well as rows: the forward and the gradients of each iteration's own
    # adapter and scale.
    rng = np.random.default_rng(1)
    examples, rows, d_in, d_out, rank = 4, 3, 6, 5, 2
    y, x, g = (rng.standard_normal((examples, rows, d)) for d in (d_out, d_in, d_out))
    a, b = rng.standard_normal((examples, d_in, rank)), rng.standard_normal((examples, rank, d_out))
    s = rng.uniform(0.5, 2.0, examples)
    y, x, g, a, b, s = (tf.cast(v, dtype) for v in (y, x, g, a, b, s))

    def body(elems):
        yi, xi, gi, ai, bi, si = elems
        with tf.GradientTape() as tape:
            tape.watch([xi, ai, bi, si])
            out = tf_lora.lora_apply(yi, xi, ai, bi, si)
        return (out, *tape.gradient(out, [xi, ai, bi, si], output_gradients=gi))

    out, dx, da, db, ds = _vmap(body, (y, x, g, a, b, s))
    y, x, g, a, b, s = (_np(v) for v in (y, x, g, a, b, s))
    xa = np.einsum("lni,lir->lnr", x, a)
    _close(out, y + s[:, None, None] * np.einsum("lnr,lro->lno", xa, b), dtype)
    _close(dx, s[:, None, None] * np.einsum("lno,lro,lir->lni", g, b, a), dtype)
    _close(da, s[:, None, None] * np.einsum("lni,lno,lro->lir", x, g, b), dtype)
    _close(db, s[:, None, None] * np.einsum("lnr,lno->lro", xa, g), dtype)
    _close(ds, np.einsum("lnr,lro,lno->l", xa, b, g), dtype)


def test_jacobian_runs_vectorized():
    rng = np.random.default_rng(2)
    x, a, b = rng.standard_normal((3, 4)), rng.standard_normal((4, 2)), rng.standard_normal((2, 5))
    y = np.zeros((3, 5))
    av = tf.Variable(a)

    @tf.function
    def jacobian():
        with tf.GradientTape() as tape:
            out = tf_lora.lora_apply(tf.constant(y), tf.constant(x), av, tf.constant(b), 2.0)
        return tape.jacobian(out, av)  # pfor, or a while_loop where an op has no converter

    graph = jacobian.get_concrete_function().graph
    types = {op.type for op in graph.get_operations()}
    types |= {node.op for f in graph.as_graph_def().library.function for node in f.node_def}
    assert "TfLora>BatchedLoraApplyGrad" in types and not [t for t in types if "While" in t]
    jac = jacobian()
    np.testing.assert_allclose(jac.numpy(), 2.0 * np.einsum("ni,ro->noir", x, b), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shared", [True, False], ids=["shared_adapters", "adapters_per_iteration"])
def test_batched_lora_apply_per_iteration_ids(shared):
    rng = np.random.default_rng(3)
    examples, rows, d_in, d_out, rank, n = 5, 4, 6, 7, 3, 3
    y, x, g = (rng.standard_normal((examples, rows, d)) for d in (d_out, d_in, d_out))
    ids = rng.integers(-1, n, (examples, rows)).astype(np.int32)
    shape = () if shared else (examples,)
    a_stack = rng.standard_normal((*shape, n, d_in, rank))
    b_stack = rng.standard_normal((*shape, n, rank, d_out))
    scales = rng.uniform(0.5, 2.0, (*shape, n))
    av, bv, sv = (tf.constant(v) for v in (a_stack, b_stack, scales))

    def body(elems):
        yi, xi, gi, ii, *adapters = elems
        ai, bi, si = adapters if adapters else (av, bv, sv)
        with tf.GradientTape() as tape:
            tape.watch([xi, ai, bi, si])
            out = tf_lora.batched_lora_apply(yi, xi, ai, bi, ii, si)
        return (out, *tape.gradient(out, [xi, ai, bi, si], output_gradients=gi))

    elems = (y, x, g, ids) if shared else (y, x, g, ids, a_stack, b_stack, scales)
    out, dx, da, db, ds = _vmap(body, tuple(tf.constant(v) for v in elems))
    if shared:  # the reference indexes each iteration's adapters
        a_stack, b_stack, scales = (
            np.broadcast_to(v, (examples, *v.shape)) for v in (a_stack, b_stack, scales)
        )
    want = [y.copy(), np.zeros_like(x), np.zeros_like(a_stack), np.zeros_like(b_stack), np.zeros_like(scales)]
    for e in range(examples):
        for n_ in range(rows):
            k = ids[e, n_]
            if k < 0:
                continue
            a, b, s = a_stack[e, k], b_stack[e, k], scales[e, k]
            xa = x[e, n_] @ a
            want[0][e, n_] += s * xa @ b
            want[1][e, n_] = s * a @ (b @ g[e, n_])
            want[2][e, k] += s * np.outer(x[e, n_], b @ g[e, n_])
            want[3][e, k] += s * np.outer(xa, g[e, n_])
            want[4][e, k] += xa @ b @ g[e, n_]
    if shared:  # a shared adapter's gradient is still each iteration's own
        assert da.shape == (examples, n, d_in, rank)
    for got, ref in zip((out, dx, da, db, ds), want, strict=True):
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12, atol=1e-12)


def test_batched_lora_apply_vectorized_refuses_bad_ids():
    # Each iteration's adapters sit side by side in one stack: an id past an iteration's own adapters must
    # still be an error, not another iteration's adapter.
    rng = np.random.default_rng(4)
    y, x = tf.zeros((2, 3, 4)), tf.constant(rng.standard_normal((2, 3, 5)), tf.float32)
    a, b = tf.ones((2, 2, 5, 1)), tf.ones((2, 2, 1, 4))
    ids = tf.constant([[0, 2, -1], [1, 0, 0]])  # 2 in iteration 0 would be iteration 1's adapter 0

    def body(elems):
        return tf_lora.batched_lora_apply(*elems, tf.ones((2,)))

    with pytest.raises(tf.errors.InvalidArgumentError, match=r"adapter_ids must be in \[-1,"):
        _vmap(body, (y, x, a, b, ids))
    with pytest.raises(tf.errors.InvalidArgumentError, match="adapter"):
        _vmap(body, (y, x, a, b, tf.constant([[0, 1, -1], [-2, 0, 0]])))


def test_lora_merge_per_iteration():
    rng = np.random.default_rng(5)
    w, a, b = rng.standard_normal((3, 4, 5)), rng.standard_normal((3, 4, 2)), rng.standard_normal((3, 2, 5))
    s = np.array([0.5, 1.0, -2.0])
    got = _vmap(lambda e: tf_lora.lora_merge(*e), tuple(tf.constant(v) for v in (w, a, b, s)))
    np.testing.assert_allclose(got.numpy(), w + s[:, None, None] * a @ b, rtol=1e-12, atol=1e-12)
    shared = _vmap(lambda e: tf_lora.lora_merge(e[0], a[0], b[0], e[1]), (tf.constant(w), tf.constant(s)))
    np.testing.assert_allclose(shared.numpy(), w + s[:, None, None] * (a[0] @ b[0]), rtol=1e-12, atol=1e-12)


def test_per_example_gradients_of_a_keras_model_with_lora():
    # As DP-SGD computes them (TensorFlow Privacy vectorizes the per-example loss gradient).
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(8, activation="relu", name="fc")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(hidden))
    model, _ = tf_lora.inject_lora(model, rank=2)
    for weight in model.trainable_weights:  # B = 0 would make A's gradients zero
        weight.assign(np.random.default_rng(1).standard_normal(weight.shape) * 0.5)
    x = np.random.default_rng(2).standard_normal((5, 6)).astype(np.float32)
    labels = np.array([0, 2, 1, 1, 0])

    def per_example(elems):
        xi, li = elems
        with tf.GradientTape() as tape:
            logits = model(xi[None])
            loss = keras.losses.sparse_categorical_crossentropy(li[None], logits, from_logits=True)
        return tape.gradient(loss, model.trainable_weights)

    vectorized = _vmap(per_example, (tf.constant(x), tf.constant(labels)))
    for e in range(len(x)):
        one_by_one = per_example((tf.constant(x[e]), tf.constant(labels[e])))
        for got, want in zip(vectorized, one_by_one, strict=True):
            np.testing.assert_allclose(got[e].numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
