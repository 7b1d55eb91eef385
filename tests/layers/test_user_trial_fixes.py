"""What a new user hit on keras-hub models, each fixed: ids frozen into a trace, apply leaving the base
trainable, copying a Keras-LoRA backbone, Keras .lora.h5 written back at another rank, settings that matched
nothing, and unclear errors for bad ids."""

import json
import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras_hub_models import tiny_backbone

import tf_lora

pytest.importorskip("keras_hub")

X = {"token_ids": np.arange(24, dtype="int32").reshape(3, 8) % 64, "padding_mask": np.ones((3, 8), "int32")}


def _two_adapters():
    backbone = tiny_backbone("llama")
    tf_lora.inject_lora(backbone, rank=4, copy=False)
    rng = np.random.default_rng(0)
    for layer in tf_lora.layers.lora_layers(backbone).values():
        layer.add_adapter("second", rank=2)
        for name in layer.adapter_names:
            slot = layer.adapter_slot(name)
            slot.b.assign(rng.standard_normal(slot.b.shape).astype(np.float32))
    alone = {}
    for name in ("default", "second", None):
        tf_lora.set_active_adapter(backbone, name)
        alone[name] = backbone(X).numpy()
    return backbone, alone


def test_ids_of_a_block_around_a_traced_call_are_refused_not_frozen():
    backbone, _ = _two_adapters()
    traced = tf.function(lambda x: backbone(x))
    with pytest.raises(
        ValueError, match="inside an adapter_ids block whose ids are values, which the trace would"
    ):
        with tf_lora.layers.adapter_ids([0, 1, -1]):
            traced(X)
    with pytest.raises(ValueError, match="PerExampleAdapters"):
        with tf_lora.layers.adapter_ids([0, 1, -1]):
            backbone.predict(X, verbose=0)


def test_per_example_adapters_wrapper_predict_export_and_keras_file(tmp_path, run_python):
    backbone, alone = _two_adapters()
    served = tf_lora.layers.PerExampleAdapters(backbone)
    for ids, names in (
        ([1, -1, 0], ("second", None, "default")),
        ([0, 0, 1], ("default", "default", "second")),
    ):
        y = served.predict((X, np.array(ids, "int32")), verbose=0)  # one trace, new ids each call
        for row, name in enumerate(names):
            np.testing.assert_allclose(y[row], alone[name][row], rtol=1e-4, atol=1e-4)
    spec = (
        {
            "token_ids": tf.TensorSpec([None, None], tf.int32),
            "padding_mask": tf.TensorSpec([None, None], tf.int32),
        },
        tf.TensorSpec([None], tf.int32),
    )
    served.export(str(tmp_path / "export"), verbose=False, input_signature=[spec])
    served.save(tmp_path / "served.keras")
    np.save(tmp_path / "tokens.npy", X["token_ids"][:2])
    run_python(
        f"""
import keras, numpy as np, tensorflow as tf, tf_lora
tokens = np.load("{tmp_path}/tokens.npy")
x = {{"token_ids": tokens, "padding_mask": np.ones_like(tokens)}}
loaded = tf.saved_model.load("{tmp_path}/export")  # another batch size than traced
np.save("{tmp_path}/exported.npy", loaded.serve((x, tf.constant([1, 0]))).numpy())
model = keras.saving.load_model("{tmp_path}/served.keras")
np.save("{tmp_path}/reloaded.npy", model.predict((x, np.array([-1, 1], "int32")), verbose=0))
"""
    )
    exported, reloaded = np.load(tmp_path / "exported.npy"), np.load(tmp_path / "reloaded.npy")
    np.testing.assert_allclose(exported[0], alone["second"][0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(exported[1], alone["default"][1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(reloaded[0], alone[None][0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(reloaded[1], alone["second"][1], rtol=1e-4, atol=1e-4)


def test_ids_that_do_not_fit_the_batch_say_so():
    backbone, _ = _two_adapters()
    with pytest.raises(tf.errors.InvalidArgumentError, match="adapter_ids must have one id per example"):
        with tf_lora.layers.adapter_ids([0, 1]):
            backbone(X)


def test_apply_attach_freezes_the_base_as_inject_does():
    backbone = tiny_backbone("gpt2")
    adapters = tf_lora.adapters.from_model(tf_lora.inject_lora(tiny_backbone("gpt2"), rank=2)[0])
    tf_lora.adapters.apply(backbone, adapters)
    assert {w.path.rsplit("/", 1)[-1] for w in backbone.trainable_weights} == {"lora_a", "lora_b"}


def test_copy_of_a_backbone_with_keras_lora_keeps_its_adapters():
    backbone = tiny_backbone("llama")
    backbone.enable_lora(4)
    for layer in backbone._flatten_layers(include_self=False):
        if getattr(layer, "lora_enabled", False):
            layer.lora_kernel_b.assign(np.full(layer.lora_kernel_b.shape, 0.1, np.float32))
    expected = backbone(X).numpy()
    model, adapted = tf_lora.inject_lora(backbone, rank=8)  # copy=True
    assert model is not backbone and len(adapted) == 14
    np.testing.assert_allclose(model(X).numpy(), expected, rtol=1e-4, atol=1e-5)


def test_keras_lora_file_goes_back_at_its_own_rank(tmp_path):
    keras_model = tiny_backbone("gpt2")
    keras_model.enable_lora(4)
    rng = np.random.default_rng(1)
    for layer in keras_model._flatten_layers(include_self=False):
        if getattr(layer, "lora_enabled", False):
            layer.lora_kernel_b.assign(rng.standard_normal(layer.lora_kernel_b.shape).astype(np.float32))
    expected = keras_model(X).numpy()
    keras_model.save_lora_weights(str(tmp_path / "a.lora.h5"))
    ours = tiny_backbone("gpt2")
    tf_lora.adapters.apply(ours, tf_lora.adapters.load_keras_lora(tmp_path / "a.lora.h5", ours))
    assert tf_lora.adapters.save_keras_lora(ours, tmp_path / "b.lora.h5") == ["query", "value"]
    fresh = tiny_backbone("gpt2")
    fresh.enable_lora(4)  # the rank it was trained at
    fresh.load_lora_weights(str(tmp_path / "b.lora.h5"))
    np.testing.assert_allclose(fresh(X).numpy(), expected, rtol=1e-4, atol=1e-5)
    everywhere = tf_lora.inject_lora(tiny_backbone("gpt2"), rank=2)[0]
    for layer in tf_lora.layers.lora_layers(everywhere).values():
        slot = layer.adapter_slot("default")
        slot.b.assign(0.1 * rng.standard_normal(slot.b.shape).astype(np.float32))
    expected = everywhere(X).numpy()
    with pytest.warns(UserWarning, match="target_layer_names=") as caught:
        tf_lora.adapters.save_keras_lora(everywhere, tmp_path / "c.lora.h5")
    # The warning's advice, followed word for word, loads the file into a fresh backbone.
    advice = re.search(r"backbone\.(enable_lora\(.*\)) before it", str(caught[0].message)).group(1)
    fresh = tiny_backbone("gpt2")
    eval("fresh." + advice, {"fresh": fresh})  # noqa: S307 - the warning's own text
    fresh.load_lora_weights(str(tmp_path / "c.lora.h5"))
    # Keras adds a @ b to the kernel, tf_lora applies it to the rows: float32 rounding through two blocks.
    np.testing.assert_allclose(fresh(X).numpy(), expected, rtol=1e-3, atol=1e-4)


def test_settings_that_match_nothing_or_layers_with_lora_already_are_errors():
    backbone = tiny_backbone("llama")
    with pytest.raises(ValueError, match=r"rank_pattern keys \['q_proj'\] match none of the layers"):
        tf_lora.inject_lora(backbone, rank_pattern={"q_proj": 2}, copy=False)
    tf_lora.inject_lora(backbone, rank=4, target=r".*query", copy=False)
    with pytest.raises(ValueError, match="self_attention/query has LoRA already"):
        tf_lora.inject_lora(backbone, rank=8, target=r".*(query|value)", copy=False)
    assert json.dumps(sorted(tf_lora.layers.lora_layers(backbone))) == json.dumps(
        ["transformer_layer_0/self_attention/query", "transformer_layer_1/self_attention/query"]
    )


def test_inject_with_dora():
    backbone = tiny_backbone("gemma")
    expected = backbone(X).numpy()
    tf_lora.inject_lora(backbone, rank=2, use_dora=True, copy=False)
    layers = tf_lora.layers.lora_layers(backbone)
    assert all(layer.use_dora for layer in layers.values())
    np.testing.assert_allclose(backbone(X).numpy(), expected, rtol=1e-4, atol=1e-5)  # magnitude = ||w||
    names = {w.path.rsplit("/", 1)[-1] for w in backbone.trainable_weights}
    assert names == {"lora_a", "lora_b", "lora_magnitude"}


@pytest.mark.parametrize("policy", ["float32", "mixed_float16", "mixed_bfloat16", "float64"])
def test_dora_runs_and_trains_in_every_dtype(policy):
    # DoRA's factor magnitude / ||w'|| divided a compute-dtype magnitude by a float32 norm: under mixed
    # precision (and for float64 layers) the forward raised "x and y must have the same dtype".
    import keras

    tol = {"float32": 1e-5, "mixed_float16": 3e-3, "mixed_bfloat16": 2e-2, "float64": 1e-12}[policy]
    keras.mixed_precision.set_global_policy(policy if policy.startswith("mixed") else "float32")
    try:
        layer = tf_lora.layers.LoraDense(
            4, rank=2, alpha=4, use_dora=True, **({"dtype": "float64"} if policy == "float64" else {})
        )
        x = np.random.default_rng(0).standard_normal((3, 5))
        layer(x)
        slot = layer.adapter_slot("default")
        rng = np.random.default_rng(1)
        slot.b.assign(rng.standard_normal(slot.b.shape))
        slot.magnitude.assign(np.abs(rng.standard_normal(slot.magnitude.shape)) + 0.5)
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.cast(layer(x), tf.float32) ** 2)
        grads = tape.gradient(loss, [slot.a, slot.b, slot.magnitude])
        # The reference: PEFT's DoRA in float64 TensorFlow ops (no gradient through the norm).
        w, a, b, m, bias = (
            tf.constant(v.numpy(), tf.float64)
            for v in (layer.kernel, slot.a, slot.b, slot.magnitude, layer.bias)
        )
        s = float(slot.scale_var.numpy())
        with tf.GradientTape() as tape:
            tape.watch([a, b, m])
            adapted = w + s * a @ b
            y = m / tf.stop_gradient(tf.norm(adapted, axis=0)) * (x @ adapted) + bias
            ref_loss = tf.reduce_sum(y**2)
        ref_grads = tape.gradient(ref_loss, [a, b, m])
        got = layer(x)
        assert got.dtype == layer.compute_dtype
        np.testing.assert_allclose(np.asarray(got, np.float64), y.numpy(), rtol=tol, atol=tol * 10)
        for g, want in zip(grads, ref_grads, strict=True):
            size = float(np.abs(want).max())
            np.testing.assert_allclose(np.asarray(g, np.float64), want.numpy(), atol=tol * 10 * size)
        layer.merge()  # and back: the weight as it was
        np.testing.assert_allclose(np.asarray(layer(x), np.float64), y.numpy(), rtol=tol, atol=tol * 10)
        layer.unmerge()
        np.testing.assert_allclose(layer.kernel.numpy(), w.numpy(), atol=tol * 10)
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_fresh_dora_adapter_leaves_the_output_exactly_as_it_was(policy):
    # A fresh DoRA adapter (B = 0, magnitude = ||w||) must change nothing. Read inside the layer's call,
    # Keras rounded the magnitude and the weight to the compute dtype, so the factor was
    # bf16(||w||) / ||bf16(w)||, off by up to a step: 21% of bf16 outputs differed.
    import keras

    keras.mixed_precision.set_global_policy(policy)
    try:
        keras.utils.set_random_seed(0)
        inputs = keras.Input((64,))
        model = keras.Model(inputs, keras.layers.Dense(48, name="d")(inputs))
        x = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
        before = model(x).numpy()
        adapted, _ = tf_lora.inject_lora(model, rank=4, use_dora=True)
        np.testing.assert_array_equal(adapted(x).numpy(), before)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_ids_that_name_different_adapters_in_different_layers_are_refused():
    # Per-example ids index each layer's adapter_names: adapters added in another order made id 1 "x" in one
    # layer and "y" in the next, and the batch silently ran a mix of both (found by a user trial).
    import keras

    p, q = tf_lora.layers.LoraDense(4, rank=2), tf_lora.layers.LoraDense(3, rank=2)
    model = keras.Sequential([keras.Input((5,)), p, q])
    q.add_adapter("y")
    for layer in (p, q):
        layer.add_adapter("x")
    x = np.ones((2, 5), np.float32)
    with pytest.raises(ValueError, match=r"id 1 is adapter 'y' here but 'x' in LoraDense"):
        with tf_lora.layers.adapter_ids([1, 0]):
            model(x)
    # Lists that agree as far as both go stay usable: p has [default, x], a fresh r has [default].
    r = tf_lora.layers.LoraDense(3, rank=2)
    short = keras.Sequential([keras.Input((5,)), p, r])
    with tf_lora.layers.adapter_ids([0, -1]):
        assert short(x).shape == (2, 3)


def test_a_fresh_dora_embedding_adapter_changes_nothing_and_one_per_example_is_refused():
    import keras

    inputs = keras.Input((3,), dtype="int32")
    model = keras.Model(inputs, keras.layers.Embedding(10, 4, name="e")(inputs))
    ids = np.array([[1, 2, 9]])
    before = model(ids).numpy()
    tf_lora.inject_lora(model, target=["e"], use_dora=True, copy=False)
    layer = model.get_layer("e")
    assert layer.use_dora
    np.testing.assert_allclose(model(ids).numpy(), before, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="DoRA adapter 'default' is served alone"):
        layer.add_adapter("x")
        model(ids)


def test_dora_over_keras_own_lora_keeps_the_outputs():
    # The magnitude started at ||w||, not at the adapted weight's norms: outputs moved by 2.7.
    import keras

    inputs = keras.Input((6,))
    model = keras.Model(inputs, keras.layers.Dense(5, name="d")(inputs))
    model.get_layer("d").enable_lora(2)
    model.get_layer("d").lora_kernel_b.assign(np.random.default_rng(0).standard_normal((2, 5)))
    x = np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32)
    expected = model(x).numpy()
    tf_lora.inject_lora(model, rank=2, use_dora=True, copy=False)
    np.testing.assert_allclose(model(x).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_mapping_may_be_a_dict_and_a_wrong_one_says_what_is_accepted():
    # A dict failed with "too many values to unpack"; a 2-character key was split into regex and replacement.
    import keras

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3, name="dense_q")(inputs))
    rng = np.random.default_rng(0)
    adapter = tf_lora.adapters.Adapter(
        a=rng.standard_normal((4, 2)).astype(np.float32),
        b=rng.standard_normal((2, 3)).astype(np.float32),
        alpha=2,
    )
    adapters = tf_lora.adapters.AdapterSet({"q_proj": adapter})
    report = tf_lora.adapters.apply(model, adapters, mapping={"q_proj": "dense_q"}, dry_run=True)
    assert report.applied == {"q_proj": "dense_q"}
    with pytest.raises(TypeError, match=r"mapping must be None, a function .* got \['ab'\]"):
        tf_lora.adapters.apply(model, adapters, mapping=["ab"])


def test_a_block_of_ids_around_an_already_traced_predict_is_refused():
    # A block of values around Keras's predict was refused only when predict traced inside it; once traced
    # outside, predict ignored the block and ran the active adapter for every example, silently.
    model = _dense_with_two_adapters()
    layer = model.get_layer("p")
    layer.adapter_slot().b.assign(-np.ones(layer.adapter_slot().b.shape, np.float32))  # active: not "other"
    x = np.ones((2, 4), np.float32)
    with tf_lora.layers.adapter_ids([1, -1]):
        eager = model(x).numpy()  # honours the ids
    assert np.abs(eager[0] - eager[1]).max() > 0.1
    model.predict(x, verbose=0)  # traced outside any block
    with pytest.raises(ValueError, match="no tf_lora LoRA layer was called inside this block"):
        with tf_lora.layers.adapter_ids([1, -1]):
            model.predict(x, verbose=0)
    wrapped = tf_lora.layers.PerExampleAdapters(model)  # what the message points to
    np.testing.assert_allclose(
        wrapped.predict((x, np.array([1, -1], np.int32)), verbose=0), eager, rtol=1e-6, atol=1e-6
    )


@keras.saving.register_keras_serializable(package="tf_lora_tests")
class _TwoDense(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.d1 = keras.layers.Dense(8, activation="relu", name="d1")
        self.d2 = keras.layers.Dense(3, name="d2")

    def call(self, x):
        return self.d2(self.d1(x))


def test_a_subclassed_model_inside_a_functional_one_keeps_its_trainable_set_through_keras_files(tmp_path):
    # Keras names the nested model's variables `net/d1/...` when built, `d1/...` when loaded: the trainable
    # set, kept by variable path, froze everything on load, so the optimizer's state was skipped and the
    # resumed fit failed ("Unknown variable: d1/lora_a").
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, _TwoDense(name="net")(inputs))
    tf_lora.inject_lora(model, rank=2, alpha=4, copy=False, train_bias=True)
    model.compile(optimizer="adam", loss="mse")
    x = np.random.default_rng(0).standard_normal((32, 4)).astype(np.float32)
    y = np.random.default_rng(1).standard_normal((32, 3)).astype(np.float32)
    model.fit(x, y, epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")

    def trainable(m):
        return sorted(
            v.path.split("/", 1)[-1] if v.path.startswith("net/") else v.path for v in m.trainable_weights
        )

    assert (
        trainable(loaded)
        == trainable(model)
        == [f"{d}/{v}" for d in ("d1", "d2") for v in ("bias", "lora_a", "lora_b")]
    )
    assert int(loaded.optimizer.iterations) == int(model.optimizer.iterations) == 1
    loaded.fit(x, y, epochs=1, verbose=0)  # resumes
    model.fit(x, y, epochs=1, verbose=0)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6
    )


def _dense_with_two_adapters():
    """A one-layer model "p" with adapters "default" (B = 0) and "other" (B = 1)."""
    keras.utils.set_random_seed(0)
    model, _ = tf_lora.inject_lora(
        keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="p")]), rank=2
    )
    layer = model.get_layer("p")
    layer.add_adapter("other", rank=2)
    layer.adapter_slot("other").b.assign(np.ones(layer.adapter_slot("other").b.shape, np.float32))
    return model


def test_per_example_adapters_take_numpy_inputs_when_called():
    # Called on numpy arrays, PerExampleAdapters failed with Keras's "Only input tensors may be passed as
    # positional arguments" (it turns off Keras's conversion, which would make the ids floats).
    model = _dense_with_two_adapters()
    served = tf_lora.layers.PerExampleAdapters(model)
    x = np.ones((2, 4), np.float32)
    expected = served((tf.constant(x), tf.constant([1, -1]))).numpy()
    assert np.abs(expected[0] - expected[1]).max() > 0.1
    np.testing.assert_array_equal(served((x, np.array([1, -1]))).numpy(), expected)
    np.testing.assert_array_equal(served((x, [1, -1])).numpy(), expected)


def test_per_example_adapters_wrap_symbolic_inputs_and_nested_blocks_use_the_innermost():
    # Converting every non-tensor input broke PerExampleAdapters in a functional model (a KerasTensor cannot
    # be converted); and a block around a block raised at its close, as if no layer had read it.
    model = _dense_with_two_adapters()
    served = tf_lora.layers.PerExampleAdapters(model)
    x_in, ids_in = keras.Input((4,)), keras.Input((), dtype="int32")
    functional = keras.Model([x_in, ids_in], served((x_in, ids_in)))
    x = np.ones((2, 4), np.float32)
    expected = served((x, np.array([1, -1]))).numpy()
    np.testing.assert_allclose(
        functional.predict([x, np.array([1, -1], np.int32)], verbose=0), expected, atol=1e-6
    )
    with tf_lora.layers.adapter_ids([-1, -1]):
        with tf_lora.layers.adapter_ids([1, -1]):
            inner = model(x).numpy()
    np.testing.assert_allclose(inner, expected, atol=1e-6)
