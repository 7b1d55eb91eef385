"""tf_lora.lora_merge (TfLora>LoraMerge) against numpy, its gradient, and its errors."""

import numpy as np
import pytest
import tensorflow as tf
from lora_test_util import RTOL, assert_close, random, run

import tf_lora
from tf_lora.python.ops import gen_lora_ops

pytestmark = pytest.mark.usefixtures("on_each_device")

SHAPES = [  # (in, out, r): full and partial row blocks and column tiles, r = 1, large r.
    (1, 1, 1),
    (3, 5, 2),
    (4, 16, 4),
    (7, 33, 3),
    (130, 70, 16),
    (257, 300, 64),
]


def _merge(mode, *args):
    return run(mode, tf_lora.lora_merge, *args)


def _reference(w, a, b, scale):
    return w + scale * (a @ b)


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("dtype", list(RTOL), ids=lambda d: d.name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_numpy(shape, dtype, mode):
    rng = np.random.default_rng(sum(shape))
    n_in, n_out, r = shape
    w, w_np = random((n_in, n_out), dtype, rng)
    a, a_np = random((n_in, r), dtype, rng)
    b, b_np = random((r, n_out), dtype, rng)
    scale = 0.625  # exact in every dtype
    merged = _merge(mode, w, a, b, scale)
    assert merged.dtype == dtype
    assert merged.shape == (n_in, n_out)
    assert_close(merged.numpy(), _reference(w_np, a_np, b_np, scale), dtype)


def test_large_multithreaded_float32():
    rng = np.random.default_rng(1)
    w, w_np = random((1031, 2053), tf.float32, rng)
    a, a_np = random((1031, 16), tf.float32, rng)
    b, b_np = random((16, 2053), tf.float32, rng)
    np.testing.assert_allclose(
        tf_lora.lora_merge(w, a, b, -1.5).numpy(), _reference(w_np, a_np, b_np, -1.5), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("dtype", [tf.float32, tf.float16], ids=lambda d: d.name)
@pytest.mark.cpu_only
def test_large_output_written_with_streaming_stores(dtype):
    # 8 MiB and more of output take the kernel's non-temporal store path (with a column tail in float32).
    rng = np.random.default_rng(3)
    n_in, n_out = (1027, 2056) if dtype == tf.float32 else (2051, 2064)
    w, w_np = random((n_in, n_out), dtype, rng)
    a, a_np = random((n_in, 16), dtype, rng)
    b, b_np = random((16, n_out), dtype, rng)
    assert_close(tf_lora.lora_merge(w, a, b, 0.75).numpy(), _reference(w_np, a_np, b_np, 0.75), dtype)


def _thp_eligible(address):
    """Whether the mapping holding `address` may use transparent huge pages (from /proc/self/smaps)."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            field = line.split()
            if "-" in field[0] and not field[0].endswith(":"):
                low, high = (int(v, 16) for v in field[0].split("-"))
                inside = low <= address < high
            elif inside and field[0] == "THPeligible:":
                return field[1] == "1"
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.cpu_only
def test_large_outputs_are_advised_onto_huge_pages():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            if "[never]" in f.read():
                pytest.skip("transparent huge pages are off on this system")
    except OSError:
        pytest.skip("no transparent huge pages here")
    w = tf.ones([2048, 2048])  # 16 MiB: over the 8 MiB threshold
    merged = tf_lora.lora_merge(w, tf.ones([2048, 4]), tf.ones([4, 2048]), 0.5)
    buffer = np.from_dlpack(merged)  # the tensor's own memory, not a copy
    np.testing.assert_array_equal(buffer[::511, ::511], np.full((5, 5), 3.0, np.float32))
    # The advice covers the output's 2 MiB-aligned interior; its middle lies there.
    assert _thp_eligible(buffer.ctypes.data + buffer.nbytes // 2)


def test_scale_tensor_and_numpy_inputs():
    rng = np.random.default_rng(2)
    w = rng.uniform(-1, 1, (6, 9)).astype(np.float32)
    a = rng.uniform(-1, 1, (6, 2)).astype(np.float32)
    b = rng.uniform(-1, 1, (2, 9)).astype(np.float32)
    merged = tf_lora.lora_merge(w, a, b, tf.constant(0.25))
    np.testing.assert_allclose(merged.numpy(), w + 0.25 * a @ b, rtol=1e-6, atol=1e-6)


def test_input_weight_is_not_overwritten():
    """The kernel may write into w's buffer only when TensorFlow forwards it (nobody else holds w)."""
    w = tf.ones([8, 8])
    a = tf.ones([8, 2])
    b = tf.ones([2, 8])
    tf_lora.lora_merge(w, a, b, 1.0)
    np.testing.assert_array_equal(w.numpy(), np.ones([8, 8], np.float32))

    @tf.function
    def merge_intermediate(x):
        w_local = x * 2.0  # only this op's output: TensorFlow may forward its buffer
        return tf_lora.lora_merge(w_local, a, b, 1.0), x

    merged, x = merge_intermediate(w)
    np.testing.assert_array_equal(merged.numpy(), np.full([8, 8], 4.0, np.float32))
    np.testing.assert_array_equal(x.numpy(), np.ones([8, 8], np.float32))


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_empty_dims(mode):
    # r = 0: the update is empty, the result is w.
    w = tf.reshape(tf.range(12, dtype=tf.float32), [3, 4])
    merged = _merge(mode, w, tf.zeros([3, 0]), tf.zeros([0, 4]), 2.0)
    np.testing.assert_array_equal(merged.numpy(), w.numpy())
    # in = 0 and out = 0: empty results of the right shape.
    assert _merge(mode, tf.zeros([0, 4]), tf.zeros([0, 2]), tf.zeros([2, 4]), 1.0).shape == (0, 4)
    assert _merge(mode, tf.zeros([3, 0]), tf.zeros([3, 2]), tf.zeros([2, 0]), 1.0).shape == (3, 0)


def test_static_shape_inference():
    @tf.function(
        input_signature=[tf.TensorSpec([None, 7]), tf.TensorSpec([5, None]), tf.TensorSpec([3, None])]
    )
    def merged_shape(w, a, b):
        out = tf_lora.lora_merge(w, a, b, 1.0)
        assert out.shape.as_list() == [5, 7], out.shape
        return out

    merged_shape.get_concrete_function()


# ---- Gradients ----


@pytest.mark.parametrize("shape", [(3, 4, 2), (9, 5, 3)], ids=str)
def test_gradient_numeric_float64(shape):
    rng = np.random.default_rng(3)
    n_in, n_out, r = shape
    args = [
        tf.constant(rng.uniform(-1, 1, (n_in, n_out))),
        tf.constant(rng.uniform(-1, 1, (n_in, r))),
        tf.constant(rng.uniform(-1, 1, (r, n_out))),
        tf.constant(0.7, tf.float64),
    ]
    theoretical, numerical = tf.test.compute_gradient(tf_lora.lora_merge, args)
    for t, n in zip(theoretical, numerical, strict=True):
        np.testing.assert_allclose(t, n, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_gradient_formulas_float32(mode):
    rng = np.random.default_rng(4)
    w_np, g_np = rng.uniform(-1, 1, (2, 6, 5)).astype(np.float32)
    a_np = rng.uniform(-1, 1, (6, 3)).astype(np.float32)
    b_np = rng.uniform(-1, 1, (3, 5)).astype(np.float32)
    w, a, b, g = map(tf.constant, (w_np, a_np, b_np, g_np))
    scale = tf.constant(1.5)

    def grads():
        with tf.GradientTape() as tape:
            tape.watch([w, a, b, scale])
            loss = tf.reduce_sum(tf_lora.lora_merge(w, a, b, scale) * g)
        return tape.gradient(loss, [w, a, b, scale])

    dw, da, db, dscale = grads() if mode == "eager" else tf.function(grads)()
    np.testing.assert_allclose(dw, g_np, rtol=1e-6)
    np.testing.assert_allclose(da, 1.5 * g_np @ b_np.T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(db, 1.5 * a_np.T @ g_np, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dscale, np.sum(g_np * (a_np @ b_np)), rtol=1e-5)


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16], ids=lambda d: d.name)
def test_gradient_half_types(dtype):
    rng = np.random.default_rng(5)
    w, w_np = random((4, 6), dtype, rng)
    a, a_np = random((4, 2), dtype, rng)
    b, b_np = random((2, 6), dtype, rng)
    scale = tf.constant(0.5, dtype)
    with tf.GradientTape() as tape:
        tape.watch([w, a, b, scale])
        loss = tf.reduce_sum(tf_lora.lora_merge(w, a, b, scale))
    dw, da, db, dscale = tape.gradient(loss, [w, a, b, scale])
    assert dscale.dtype == dtype
    g = np.ones((4, 6))
    np.testing.assert_allclose(dw.numpy().astype(np.float64), g)
    np.testing.assert_allclose(da.numpy().astype(np.float64), 0.5 * g @ b_np.T, rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(db.numpy().astype(np.float64), 0.5 * a_np.T @ g, rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(float(dscale.numpy()), np.sum(a_np @ b_np), rtol=2e-2, atol=2e-2)


# ---- Bad input ----

BAD_SHAPES = [  # (w, a, b, scale shapes), what the error must name
    (([5, 7], [4, 3], [3, 7], []), "in (w.shape[0], a.shape[0])"),
    (([5, 7], [5, 3], [2, 7], []), "r (a.shape[1], b.shape[0])"),
    (([5, 7], [5, 3], [3, 6], []), "out (w.shape[1], b.shape[1])"),
]


@pytest.mark.parametrize("shapes,what", BAD_SHAPES, ids=lambda x: str(x))
def test_mismatched_shapes_at_graph_construction(shapes, what):
    args = [tf.zeros(s) for s in shapes]
    with pytest.raises(ValueError) as info:
        tf.function(tf_lora.lora_merge).get_concrete_function(*args)
    message = str(info.value)
    assert "LoraMerge" in message and what in message
    assert "[5,7]" in message  # the shapes received


@pytest.mark.parametrize("shapes,what", BAD_SHAPES, ids=lambda x: str(x))
def test_mismatched_shapes_at_run_time(shapes, what):
    """Shapes unknown when the graph is built are checked by the kernel."""
    unknown = [tf.TensorSpec([None, None])] * 3 + [tf.TensorSpec(None)]
    merge = tf.function(tf_lora.lora_merge, input_signature=unknown)
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        merge(*[tf.zeros(s) for s in shapes])
    message = str(info.value)
    assert "LoraMerge: expected a [5, r] and b [r, 7]" in message
    assert "got w [5,7]" in message


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_eager_mismatch_names_shapes(mode):
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match=r"\[5,7\].*\[4,3\]"):
        _merge(mode, tf.zeros([5, 7]), tf.zeros([4, 3]), tf.zeros([3, 7]), 1.0)


@pytest.mark.parametrize(
    "shapes",
    [([2, 3, 4], [2, 1], [1, 4], []), ([2, 4], [2], [1, 4], []), ([2, 4], [2, 1], [1, 4], [1])],
    ids=["w rank 3", "a rank 1", "scale rank 1"],
)
def test_wrong_ranks(shapes):
    args = [tf.zeros(s) for s in shapes]
    with pytest.raises(ValueError, match="must be rank"):
        tf.function(tf_lora.lora_merge).get_concrete_function(*args)
    unknown = [tf.TensorSpec(None)] * 4
    with pytest.raises(tf.errors.InvalidArgumentError, match="LoraMerge: expected w \\[in, out\\]"):
        tf.function(tf_lora.lora_merge, input_signature=unknown)(*args)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError)):
        tf_lora.lora_merge(*args)


def test_wrong_dtypes():
    w, a64, b = tf.zeros([2, 3]), tf.zeros([2, 1], tf.float64), tf.zeros([1, 3])
    # Eager execution reports the mismatch as InvalidArgumentError, graph construction as TypeError;
    # both name the expected and the received dtype.
    with pytest.raises(tf.errors.InvalidArgumentError, match="expected to be a float tensor but is a double"):
        tf_lora.lora_merge(w, a64, b, 1.0)
    with pytest.raises(TypeError, match="float64.*float32"):
        tf.function(tf_lora.lora_merge)(w, a64, b, 1.0)
    ints = [tf.zeros([2, 3], tf.int32), tf.zeros([2, 1], tf.int32), tf.zeros([1, 3], tf.int32), 1]
    with pytest.raises(tf.errors.InvalidArgumentError, match="int32 is not in the list of allowed values"):
        tf_lora.lora_merge(*ints)
    with pytest.raises(TypeError, match="int32"):
        tf.function(tf_lora.lora_merge)(*ints)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
def test_a_non_finite_scale_is_refused_by_every_op(bad, dtype):
    # Accepted before: every output row it touched became NaN, silently.
    x, y = tf.ones([3, 4], dtype), tf.ones([3, 5], dtype)
    a, b, w = tf.ones([4, 2], dtype), tf.ones([2, 5], dtype), tf.ones([4, 5], dtype)
    s = tf.constant(bad, dtype)
    scales = tf.constant([1.0, bad], dtype)
    ids = tf.constant([0, 1, -1])
    a_stack, b_stack = tf.stack([a, a]), tf.stack([b, b])
    var = tf.Variable(w)
    calls = {
        "LoraMerge: scale": lambda: tf_lora.lora_merge(w, a, b, s),
        "LoraApply: scale": lambda: tf_lora.lora_apply(y, x, a, b, s),
        "LoraApplyGrad: scale": lambda: gen_lora_ops.tf_lora_lora_apply_grad(y, x, a, b, s, [], []),
        "BatchedLoraApply: scales": lambda: tf_lora.batched_lora_apply(y, x, a_stack, b_stack, ids, scales),
        "BatchedLoraApplyGrad: scales": lambda: gen_lora_ops.tf_lora_batched_lora_apply_grad(
            y, x, a_stack, b_stack, ids, scales, [], []
        ),
        "ResourceLoraMerge: scale": lambda: tf_lora.merge_into_variable(var, a, b, s),
    }
    for message, call in calls.items():
        with pytest.raises(tf.errors.InvalidArgumentError, match=f"{message} must be finite"):
            call()
    np.testing.assert_array_equal(var.numpy(), w.numpy())  # left as it was


def test_int64_adapter_ids_are_accepted():
    # batched_lora_apply refused int64 ids (what tf.data and Keras inputs often give).
    rng = np.random.default_rng(0)
    y, x = rng.normal(size=[4, 3]).astype(np.float32), rng.normal(size=[4, 2]).astype(np.float32)
    a_stack, b_stack = (
        rng.normal(size=[2, 2, 1]).astype(np.float32),
        rng.normal(size=[2, 1, 3]).astype(np.float32),
    )
    ids = np.array([1, -1, 0, 1])
    got = tf_lora.batched_lora_apply(y, x, a_stack, b_stack, tf.constant(ids, tf.int64), [1.0, 0.5])
    want = y.copy()
    for i, k in enumerate(ids):
        if k >= 0:
            want[i] += [1.0, 0.5][k] * (x[i] @ a_stack[k]) @ b_stack[k]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)
