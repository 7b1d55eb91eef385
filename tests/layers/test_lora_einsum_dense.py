"""LoraEinsumDense: LoRA on EinsumDense kernels seen as [in, out] through the equation, against numpy."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_lora

# (equation, output_shape, bias_axes, input shape): Keras's MultiHeadAttention and keras-hub's GPT-2, Llama
# and Gemma projections, an ellipsis, and layouts that need transposes (input axes not last, batch axes in
# another order in the output).
CASES = [
    ("abc,cde->abde", (None, 2, 4), "de", (2, 3, 8)),  # MHA / GPT-2 query
    ("abcd,cde->abe", (None, 8), "e", (2, 3, 2, 4)),  # MHA / GPT-2 attention output
    ("bqm,muh->bquh", (None, 4, 2), None, (2, 3, 8)),  # Llama query
    ("bquh,uhm->bqm", (None, 8), None, (2, 3, 4, 2)),  # Llama attention output
    ("btd,ndh->btnh", (None, 2, 4), None, (2, 3, 8)),  # Gemma query: kernel [heads, in, head_dim]
    ("bsd,kdh->bskh", (None, 1, 4), None, (2, 3, 8)),  # Gemma key/value
    ("btd,df->btf", (None, 6), None, (2, 3, 8)),  # Gemma feed-forward
    ("...b,bc->...c", (5,), "c", (2, 3, 4, 8)),  # ellipsis
    ("abc,bd->acd", (3, 5), None, (2, 8, 3)),  # the input axis in the middle
    ("abc,cd->adb", (5, 3), None, (2, 3, 8)),  # the output axis between the batch axes
]


def _reference(equation, x, kernel, bias, a, b, scale):
    """numpy: einsum with kernel + scale * (a @ b) laid out on the kernel's axes (input axes, then output
    axes, each flattened in kernel order), plus the bias."""
    inputs, out = equation.split("->")
    spec_x, spec_k = inputs.split(",")
    spec_x, out = spec_x.replace("...", ""), out.replace("...", "")
    in_axes = "".join(c for c in spec_k if c in spec_x and c not in out)
    out_axes = "".join(c for c in spec_k if c in out and c not in spec_x)
    sizes = dict(zip(spec_k, kernel.shape, strict=True))
    update = (a @ b).reshape([sizes[c] for c in in_axes + out_axes])
    kernel = kernel + scale * np.einsum(f"{in_axes + out_axes}->{spec_k}", update)
    y = np.einsum(equation, x, kernel)
    return y if bias is None else y + bias


@pytest.mark.parametrize("equation,output_shape,bias_axes,x_shape", CASES, ids=[c[0] for c in CASES])
def test_forward_merge_and_gradient_match_numpy(equation, output_shape, bias_axes, x_shape):
    rng = np.random.default_rng(0)
    layer = tf_lora.layers.LoraEinsumDense(
        equation, output_shape, bias_axes=bias_axes, rank=3, alpha=6, bias_initializer="random_normal"
    )
    x = rng.standard_normal(x_shape).astype(np.float32)
    layer(x)
    slot = layer.adapter_slot()
    slot.b.assign(rng.standard_normal(slot.b.shape).astype(np.float32))
    kernel, bias = layer.kernel.numpy(), None if layer.bias is None else layer.bias.numpy()
    expected = _reference(equation, x, kernel, bias, slot.a.numpy(), slot.b.numpy(), 2.0)
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tf.function(layer)(x).numpy(), expected, rtol=1e-5, atol=1e-5)
    # Merged into the kernel in its own layout, the plain einsum gives the same.
    layer.merge()
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        _reference(equation, x, layer.kernel.numpy(), bias, slot.a.numpy(), 0 * slot.b.numpy(), 0.0),
        expected,
        rtol=1e-5,
        atol=1e-5,
    )
    layer.unmerge()
    np.testing.assert_allclose(layer.kernel.numpy(), kernel, atol=1e-5)
    # Gradients against TensorFlow's autodiff of the numpy-equivalent composition.
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x) ** 2)
    da, db = tape.gradient(loss, [slot.a, slot.b])
    a, b = tf.Variable(slot.a.numpy()), tf.Variable(slot.b.numpy())
    view = layer.view
    with tf.GradientTape() as tape:
        update = view.kernel_update(tf.matmul(a, b))
        y = tf.einsum(equation, x, kernel + 2.0 * update) + (0 if bias is None else bias)
        loss = tf.reduce_sum(y**2)
    ea, eb = tape.gradient(loss, [a, b])
    np.testing.assert_allclose(da.numpy(), ea.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(db.numpy(), eb.numpy(), rtol=1e-4, atol=1e-4)


def test_per_example_adapter_ids_cover_every_row():
    rng = np.random.default_rng(1)
    layer = tf_lora.layers.LoraEinsumDense("btd,ndh->btnh", (None, 2, 4), rank=2)
    x = rng.standard_normal((3, 5, 8)).astype(np.float32)
    layer(x)
    layer.add_adapter("other", rank=4, alpha=2)
    for name in layer.adapter_names:
        slot = layer.adapter_slot(name)
        slot.b.assign(rng.standard_normal(slot.b.shape).astype(np.float32))
    alone = {}
    for name in layer.adapter_names:
        layer.set_active_adapter(name)
        alone[name] = layer(x).numpy()
    layer.set_active_adapter(None)
    base = layer(x).numpy()
    y = layer(x, adapter_ids=[1, -1, 0]).numpy()  # one id per example, for all 5 positions
    np.testing.assert_allclose(y[0], alone["other"][0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y[1], base[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y[2], alone["default"][2], rtol=1e-5, atol=1e-5)
    with tf_lora.layers.adapter_ids([0, 0, 1]):  # the same through a block, for layers deep in a model
        y = layer(x).numpy()
    np.testing.assert_allclose(y[2], alone["other"][2], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y[0], alone["default"][0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "equation,message",
    [
        ("abc,cd->abd", None),
        ("abc,bcd->abd", "kernel axes \\['b'\\] are in both the input and the output"),
        ("abc,cd->ad", "input axes are summed away"),
        ("ab...,bc->ac...", "'...' only at the start"),
    ],
)
def test_equations_without_an_in_out_view_are_refused(equation, message):
    output_shape = {"abc,cd->ad": (4,), "abc,bcd->abd": (3, 4)}.get(equation, (None, 4))
    layer = keras.layers.EinsumDense(equation, output_shape)
    if equation == "ab...,bc->ac...":
        layer = keras.layers.EinsumDense(equation, (4,))
        layer(np.ones((2, 3, 5), np.float32))
    else:
        layer(np.ones((2, 3, 5), np.float32))
    if message is None:
        tf_lora.layers.to_lora(layer, 2, 4)
        return
    with pytest.raises(ValueError, match=message):
        tf_lora.layers.to_lora(layer, 2, 4)
    assert type(layer) is keras.layers.EinsumDense and len(layer.weights) == 1  # left as it was


def test_keras_round_trip_and_mixed_precision(tmp_path):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        inp = keras.Input((4, 8))
        out = tf_lora.layers.LoraEinsumDense("abc,cde->abde", (4, 2, 3), rank=2, name="proj")(inp)
        model = keras.Model(inp, out)
        layer = model.get_layer("proj")
        assert layer.adapter_slot().a.dtype == "float32" and layer.compute_dtype == "float16"
        layer.adapter_slot().b.assign(np.full(layer.adapter_slot().b.shape, 0.5, np.float32))
        x = np.random.default_rng(2).standard_normal((2, 4, 8)).astype(np.float32)
        y = model(x).numpy()
        assert y.dtype == np.float16
        expected = _reference(
            "abc,cde->abde",
            x,
            layer.kernel.numpy(),
            None,
            layer.adapter_slot().a.numpy(),
            layer.adapter_slot().b.numpy(),
            8.0,
        )
        np.testing.assert_allclose(y, expected, rtol=2e-2, atol=2e-2)
        model.save(tmp_path / "m.keras")
        loaded = keras.saving.load_model(tmp_path / "m.keras")
        np.testing.assert_array_equal(loaded(x).numpy(), y)
        assert {w.path for w in loaded.trainable_weights} == {w.path for w in model.trainable_weights}
    finally:
        keras.mixed_precision.set_global_policy("float32")
