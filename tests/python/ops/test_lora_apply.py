"""tf_lora.lora_apply (TfLora>LoraApply) and tf_lora.lora_matmul against numpy: values, gradients, errors."""

import numpy as np
import pytest
import tensorflow as tf
from lora_test_util import RTOL, assert_close, random, run

import tf_lora

pytestmark = pytest.mark.usefixtures("on_each_device")

SHAPES = [  # (N, in, out, r): row/column tails, r over one tile, decode-sized N.
    (1, 1, 1, 1),
    (1, 300, 257, 8),
    (3, 5, 7, 2),
    (16, 64, 48, 16),
    (9, 33, 70, 17),
    (130, 64, 96, 40),
]


def _reference(y, x, a, b, scale):
    return y + scale * (x @ a) @ b


def _inputs(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    n, n_in, n_out, r = shape
    return [random(s, dtype, rng) for s in [(n, n_out), (n, n_in), (n_in, r), (r, n_out)]]


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("dtype", list(RTOL), ids=lambda d: d.name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_apply_matches_numpy(shape, dtype, mode):
    (y, y_np), (x, x_np), (a, a_np), (b, b_np) = _inputs(shape, dtype, seed=sum(shape))
    out = run(mode, tf_lora.lora_apply, y, x, a, b, -0.75)
    assert out.dtype == dtype and out.shape == y.shape
    n, n_in, _, r = shape
    assert_close(out.numpy(), _reference(y_np, x_np, a_np, b_np, -0.75), dtype, terms=n_in * r)


def test_apply_large_batch():
    (y, y_np), (x, x_np), (a, a_np), (b, b_np) = _inputs((8192, 96, 80, 16), tf.float32, seed=5)
    out = tf_lora.lora_apply(y, x, a, b, 0.5)
    assert_close(out.numpy(), _reference(y_np, x_np, a_np, b_np, 0.5), tf.float32, terms=96 * 16)


def test_apply_and_gradient_with_streamed_outputs():
    # y_out and dx of 8 MiB each: both take the kernels' non-temporal store path.
    (y, y_np), (x, x_np), (a, a_np), (b, b_np) = _inputs((8192, 256, 256, 16), tf.float32, seed=6)
    g_np = np.random.default_rng(7).uniform(-1, 1, (8192, 256))
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = tf_lora.lora_apply(y, x, a, b, 0.5)
        loss = tf.reduce_sum(out * tf.constant(g_np, tf.float32))
    dx = tape.gradient(loss, x)
    assert_close(out.numpy(), _reference(y_np, x_np, a_np, b_np, 0.5), tf.float32, terms=256 * 16)
    assert_close(dx.numpy(), 0.5 * g_np @ b_np.T @ a_np.T, tf.float32, terms=256 * 16)


OUT_OF_MEMORY = """
import numpy as np, tensorflow as tf, tf_lora
out = 1 << 22  # b packed for 9 rows: 16 x 4M floats = 256 MiB of scratch
rows = 9  # more than one parallel block of rows (kRows, 8): b is packed, not read in place
y, x, a, b = tf.ones([rows, out]), tf.ones([rows, 1]), tf.ones([1, 16]), tf.ones([16, out])
var = tf.Variable(tf.ones([rows, out]))
errors = []
with address_space_headroom(160 << 20):
    for name, call in [
        ("LoraApply", lambda: tf_lora.lora_apply(y, x, a, b, 1.0)),
        ("ResourceLoraMerge", lambda: tf_lora.merge_into_variable(var, tf.ones([rows, 16]), b, 1.0)),
    ]:
        try:
            call()
        except tf.errors.ResourceExhaustedError as e:
            assert f"{name}: out of memory for the kernel's scratch buffers" in str(e), str(e)
            errors.append(name)
assert errors == ["LoraApply", "ResourceLoraMerge"], errors
assert np.all(var.numpy() == 1.0), "the variable must be unchanged"
got = tf_lora.lora_apply(y[:, :1000], x, a, b[:, :1000], 1.0).numpy()
np.testing.assert_array_equal(got, np.full((rows, 1000), 17.0))
print("OK")
"""


@pytest.mark.cpu_only
def test_out_of_memory_for_scratch_is_an_error(run_python):
    # The kernels' scratch (here b packed for 9 rows, 256 MiB) cannot be had under an address-space limit:
    # a ResourceExhausted error, not a dead process (a std::bad_alloc through TensorFlow's frames would
    # abort), and merge_into_variable leaves the variable as it was.
    assert "OK" in run_python(OUT_OF_MEMORY)


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_apply_empty(mode):
    y = tf.reshape(tf.range(12, dtype=tf.float32), [3, 4])
    # r = 0 and in = 0: the update is empty, y comes back.
    np.testing.assert_array_equal(
        run(mode, tf_lora.lora_apply, y, tf.ones([3, 5]), tf.ones([5, 0]), tf.ones([0, 4]), 2.0), y
    )
    np.testing.assert_array_equal(
        run(mode, tf_lora.lora_apply, y, tf.ones([3, 0]), tf.ones([0, 2]), tf.ones([2, 4]), 2.0), y
    )
    # N = 0: an empty batch returns the empty y.
    out = run(
        mode, tf_lora.lora_apply, tf.zeros([0, 4]), tf.zeros([0, 5]), tf.ones([5, 2]), tf.ones([2, 4]), 1.0
    )
    assert out.shape == (0, 4)


def test_apply_does_not_overwrite_a_live_input():
    y = tf.ones([8, 8])
    tf_lora.lora_apply(y, tf.ones([8, 3]), tf.ones([3, 2]), tf.ones([2, 8]), 1.0)
    np.testing.assert_array_equal(y.numpy(), np.ones([8, 8], np.float32))


@pytest.mark.parametrize("shape", [(4, 3, 5, 2), (7, 6, 4, 3)], ids=str)
def test_apply_gradient_numeric_float64(shape):
    args = [t for t, _ in _inputs(shape, tf.float64, seed=3)] + [tf.constant(0.7, tf.float64)]
    theoretical, numerical = tf.test.compute_gradient(tf_lora.lora_apply, args)
    for t, n in zip(theoretical, numerical, strict=True):
        np.testing.assert_allclose(t, n, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_apply_gradient_formulas(mode):
    (y, _), (x, x_np), (a, a_np), (b, b_np) = _inputs((6, 5, 4, 3), tf.float32, seed=4)
    g_np = np.random.default_rng(9).uniform(-1, 1, (6, 4)).astype(np.float32)
    scale = tf.constant(1.5)

    def grads():
        with tf.GradientTape() as tape:
            tape.watch([y, x, a, b, scale])
            loss = tf.reduce_sum(tf_lora.lora_apply(y, x, a, b, scale) * g_np)
        return tape.gradient(loss, [y, x, a, b, scale])

    dy, dx, da, db, dscale = run(mode, grads)
    x_np, a_np, b_np = (v.astype(np.float32) for v in (x_np, a_np, b_np))
    np.testing.assert_allclose(dy, g_np)
    np.testing.assert_allclose(dx, 1.5 * g_np @ b_np.T @ a_np.T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(da, 1.5 * x_np.T @ (g_np @ b_np.T), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(db, 1.5 * (x_np @ a_np).T @ g_np, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dscale, np.sum(g_np * (x_np @ a_np @ b_np)), rtol=1e-5)


# ---- lora_matmul ----


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("batch", [(), (3,), (2, 3)], ids=str)
@pytest.mark.parametrize("with_bias", [False, True])
def test_matmul_matches_numpy(batch, with_bias, mode):
    rng = np.random.default_rng(len(batch))
    x, x_np = random(batch + (4, 10), tf.float32, rng)
    w, w_np = random((10, 6), tf.float32, rng)
    a, a_np = random((10, 2), tf.float32, rng)
    b, b_np = random((2, 6), tf.float32, rng)
    bias, bias_np = random((6,), tf.float32, rng)
    out = run(mode, lambda *t: tf_lora.lora_matmul(*t, bias=bias if with_bias else None), x, w, a, b, 2.0)
    expected = x_np @ w_np + (bias_np if with_bias else 0) + 2.0 * (x_np @ a_np) @ b_np
    assert out.shape == batch + (4, 6)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_matmul_static_shape_with_unknown_batch():
    @tf.function(input_signature=[tf.TensorSpec([None, None, 10])])
    def layer(x):
        out = tf_lora.lora_matmul(x, tf.ones([10, 6]), tf.ones([10, 2]), tf.ones([2, 6]), 1.0)
        assert out.shape.as_list() == [None, None, 6], out.shape
        return out

    assert layer(tf.ones([2, 3, 10])).shape == (2, 3, 6)


def test_matmul_gradients_match_composition():
    rng = np.random.default_rng(7)
    x, w, a, b = (random(s, tf.float64, rng)[0] for s in [(2, 5, 8), (8, 6), (8, 3), (3, 6)])
    bias = random((6,), tf.float64, rng)[0]

    def grads(layer):
        with tf.GradientTape() as tape:
            tape.watch([x, w, a, b, bias])
            loss = tf.reduce_sum(tf.sin(layer()))
        return tape.gradient(loss, [x, w, a, b, bias])

    ours = grads(lambda: tf_lora.lora_matmul(x, w, a, b, 0.3, bias=bias))
    composed = grads(lambda: x @ w + bias + 0.3 * (x @ a) @ b)
    for got, expected in zip(ours, composed, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


# ---- Bad input ----

BAD_SHAPES = [  # (y, x, a, b) shapes, what the error must name
    (([5, 7], [4, 3], [3, 2], [2, 7]), "N (y.shape[0], x.shape[0])"),
    (([5, 7], [5, 3], [4, 2], [2, 7]), "in (x.shape[1], a.shape[0])"),
    (([5, 7], [5, 3], [3, 2], [1, 7]), "r (a.shape[1], b.shape[0])"),
    (([5, 7], [5, 3], [3, 2], [2, 6]), "out (y.shape[1], b.shape[1])"),
]


@pytest.mark.parametrize("shapes,what", BAD_SHAPES, ids=lambda x: str(x))
def test_apply_bad_shapes_static(shapes, what):
    args = [tf.zeros(s) for s in shapes] + [tf.constant(1.0)]
    with pytest.raises(ValueError) as info:
        tf.function(tf_lora.lora_apply).get_concrete_function(*args)
    assert "LoraApply" in str(info.value) and what in str(info.value)


@pytest.mark.parametrize("shapes,what", BAD_SHAPES, ids=lambda x: str(x))
def test_apply_bad_shapes_run_time(shapes, what):
    apply = tf.function(
        tf_lora.lora_apply, input_signature=[tf.TensorSpec([None, None])] * 4 + [tf.TensorSpec(None)]
    )
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=r"LoraApply: expected x \[5, in\].*got y \[5,7\]"
    ):
        apply(*[tf.zeros(s) for s in shapes], tf.constant(1.0))


def test_apply_wrong_ranks_and_dtypes():
    with pytest.raises(ValueError, match="must be rank 2"):
        tf.function(tf_lora.lora_apply).get_concrete_function(
            tf.zeros([2, 3, 4]), tf.zeros([2, 5]), tf.zeros([5, 1]), tf.zeros([1, 4]), tf.constant(1.0)
        )
    unknown = tf.function(tf_lora.lora_apply, input_signature=[tf.TensorSpec(None)] * 5)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"LoraApply: expected y \[N, out\]"):
        unknown(tf.zeros([2, 4]), tf.zeros([2, 5]), tf.zeros([5, 1]), tf.zeros([1, 4]), tf.zeros([1]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="expected to be a float tensor but is a double"):
        tf_lora.lora_apply(
            tf.zeros([2, 4]), tf.zeros([2, 5], tf.float64), tf.zeros([5, 1]), tf.zeros([1, 4]), 1.0
        )
    with pytest.raises(TypeError, match="int32"):
        tf.function(tf_lora.lora_apply)(
            *[tf.zeros(s, tf.int32) for s in ([2, 4], [2, 5], [5, 1], [1, 4])], tf.constant(1)
        )


def test_apply_second_order_gradient_numeric_float64():
    """The registered gradient of LoraApplyGrad, through a loss built on first-order gradients."""
    (y, _), (x, _), (a, _), (b, _) = _inputs((5, 4, 3, 2), tf.float64, seed=11)
    scale = tf.constant(0.9, tf.float64)

    def penalty(x, a, b, scale):
        with tf.GradientTape() as tape:
            tape.watch([x, a, b, scale])
            loss = tf.reduce_sum(tf.sin(tf_lora.lora_apply(y, x, a, b, scale)))
        dx, da, db, dscale = tape.gradient(loss, [x, a, b, scale])
        return tf.reduce_sum(dx * dx) + tf.reduce_sum(tf.cos(da)) + tf.reduce_sum(db**3) + dscale**2

    theoretical, numerical = tf.test.compute_gradient(penalty, [x, a, b, scale])
    for t, n in zip(theoretical, numerical, strict=True):
        # Central differences (step 1e-3) of cubic terms are good to about 1e-6 here; a wrong second
        # derivative is off by O(1).
        np.testing.assert_allclose(t, n, rtol=1e-5, atol=1e-5)


def test_apply_grad_op_checks_its_inputs():
    from tf_lora.python.ops import gen_lora_ops

    with pytest.raises(
        tf.errors.InvalidArgumentError, match=r"LoraApplyGrad: expected x \[5, in\].*got grad \[5,7\]"
    ):
        gen_lora_ops.tf_lora_lora_apply_grad(
            tf.zeros([5, 7]), tf.zeros([4, 3]), tf.zeros([3, 2]), tf.zeros([2, 7]), 1.0, [], []
        )
    with pytest.raises(ValueError, match=r"LoraApplyGrad: out \(grad.shape\[1\], b.shape\[1\]\)"):
        tf.function(gen_lora_ops.tf_lora_lora_apply_grad).get_concrete_function(
            tf.zeros([5, 7]), tf.zeros([5, 3]), tf.zeros([3, 2]), tf.zeros([2, 6]), tf.constant(1.0), [], []
        )
    # saved = 1: LoraApply's x @ a and the gradient for it must be [N, r].
    args = [tf.zeros([5, 7]), tf.zeros([5, 3]), tf.zeros([3, 2]), tf.zeros([2, 7]), 1.0]
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match=r"LoraApplyGrad: expected xa and grad_xa \[N, r\] = \[5,2\].*got .*xa \[5,3\], grad_xa \[5,2\]",
    ):
        gen_lora_ops.tf_lora_lora_apply_grad(*args, [tf.zeros([5, 3])], [tf.zeros([5, 2])])
    with pytest.raises(ValueError, match=r"LoraApplyGrad: N \(x.shape\[0\], grad_xa.shape\[0\]\)"):
        tf.function(gen_lora_ops.tf_lora_lora_apply_grad).get_concrete_function(
            *args[:4], tf.constant(1.0), [tf.zeros([5, 2])], [tf.zeros([4, 2])]
        )


@pytest.mark.parametrize("dtype", list(RTOL), ids=lambda d: d.name)
def test_apply_outputs_x_at_a_for_its_gradient(dtype):
    from tf_lora.python.ops import gen_lora_ops

    (y, _), (x, x_np), (a, a_np), (b, _) = _inputs((9, 33, 70, 17), dtype, seed=12)
    out = gen_lora_ops.tf_lora_lora_apply(y, x, a, b, tf.constant(0.5, dtype))
    assert out.xa.dtype == dtype and out.xa.shape == (9, 17)
    assert_close(out.xa.numpy(), x_np @ a_np, dtype, terms=33)


@pytest.mark.parametrize("dtype", list(RTOL), ids=lambda d: d.name)
def test_apply_grad_with_saved_x_at_a(dtype):
    """LoraApplyGrad given x @ a (off by 0.5 here, to see which one it used) and a gradient for it: float32
    and float64 use the given x @ a, half types compute it again in float32; grad_xa joins dx and da."""
    from tf_lora.python.ops import gen_lora_ops

    rng = np.random.default_rng(13)
    (g, g_np), (x, x_np), (a, a_np), (b, b_np) = _inputs((37, 40, 21, 5), dtype, seed=13)
    grad_xa, grad_xa_np = random((37, 5), dtype, rng)
    given = tf.cast(tf.constant(x_np @ a_np + 0.5), dtype)
    dx, da, db, dscale = gen_lora_ops.tf_lora_lora_apply_grad(
        g, x, a, b, tf.constant(0.75, dtype), [given], [grad_xa]
    )
    xa = given.numpy().astype(np.float64) if dtype in (tf.float32, tf.float64) else x_np @ a_np
    gbt = g_np @ b_np.T
    u = 0.75 * gbt + grad_xa_np
    assert_close(dx.numpy(), u @ a_np.T, dtype, terms=21 * 5)
    assert_close(da.numpy(), x_np.T @ u, dtype, terms=37 * 21)
    assert_close(db.numpy(), 0.75 * xa.T @ g_np, dtype, terms=37 * 40)
    assert_close(dscale.numpy(), np.sum(xa * gbt), dtype, terms=37 * 5 * 61)


def test_apply_gradient_reuses_the_forward_x_at_a():
    """The registered gradient hands LoraApply's x @ a to LoraApplyGrad (saved = 1)."""

    @tf.function
    def step(y, x, a, b):
        with tf.GradientTape() as tape:
            tape.watch([x, a, b])
            out = tf_lora.lora_apply(y, x, a, b, 1.5)
        return tape.gradient(out, [x, a, b], output_gradients=tf.ones_like(out))

    (y, _), (x, _), (a, _), (b, _) = _inputs((6, 5, 4, 3), tf.float32, seed=14)
    graph = step.get_concrete_function(y, x, a, b).graph
    (grad_op,) = [op for op in graph.get_operations() if op.type == "TfLora>LoraApplyGrad"]
    (apply_op,) = [op for op in graph.get_operations() if op.type == "TfLora>LoraApply"]
    assert grad_op.get_attr("saved") == 1
    assert grad_op.inputs[5] is apply_op.outputs[1]


def test_apply_grad_nodes_from_before_saved_x_at_a_still_run():
    """A graph written before LoraApplyGrad took x @ a: its node has five inputs and no `saved` attribute
    (it defaults to 0), and computes the same gradients."""
    (y, y_np), (x, x_np), (a, a_np), (b, b_np) = _inputs((6, 5, 4, 3), tf.float32, seed=15)
    g_np = np.random.default_rng(16).uniform(-1, 1, (6, 4)).astype(np.float32)
    with tf.Graph().as_default() as graph:
        args = [tf.constant(v, tf.float32) for v in (g_np, x_np, a_np, b_np, 0.5)]
        from tf_lora.python.ops import gen_lora_ops

        gen_lora_ops.tf_lora_lora_apply_grad(*args, [], [], name="grad")
    old = graph.as_graph_def()
    (node,) = [n for n in old.node if n.name == "grad"]
    del node.attr["saved"]
    assert len(node.input) == 5
    with tf.Graph().as_default() as imported:
        outputs = tf.compat.v1.import_graph_def(old, return_elements=["grad:0", "grad:1"], name="")
        with tf.compat.v1.Session(graph=imported) as session:
            dx, da = session.run(outputs)
    x_np, a_np, b_np = (v.astype(np.float32) for v in (x_np, a_np, b_np))
    np.testing.assert_allclose(dx, 0.5 * g_np @ b_np.T @ a_np.T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(da, 0.5 * x_np.T @ (g_np @ b_np.T), rtol=1e-5, atol=1e-6)
