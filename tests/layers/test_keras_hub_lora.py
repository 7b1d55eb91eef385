"""LoRA on keras-hub transformers built from small configs (GPT-2, Llama with grouped-query attention,
Gemma): inject at any depth, fit, merge, `.keras` round trips in a fresh process, export, per-example
adapters reaching every adapted layer, merge_and_unload to plain Keras layers."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras_hub_models import KINDS, VOCAB, tiny_backbone

import tf_lora

keras_hub = pytest.importorskip("keras_hub")


def _backbone(kind):
    return tiny_backbone(kind)


# The attention projections of each: EinsumDense layers two levels down.
ATTENTION = {
    "gpt2": "transformer_layer_{}/self_attention/{}",
    "llama": "transformer_layer_{}/self_attention/{}",
    "gemma": "decoder_block_{}/attention/{}",
}
SOURCE = f"""
import keras, keras_hub, numpy as np
keras.utils.set_random_seed(0)
VOCAB = {VOCAB}
"""


def _inputs(batch=3, length=8, seed=1):
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, length), "int32")
    mask[0, -2:] = 0
    return {"token_ids": rng.integers(0, VOCAB, (batch, length)).astype("int32"), "padding_mask": mask}


def _randomize_adapters(model, seed, name="default"):
    rng = np.random.default_rng(seed)
    for layer in tf_lora.layers.lora_layers(model).values():
        slot = layer.adapter_slot(name)
        slot.b.assign(0.2 * rng.standard_normal(slot.b.shape).astype(np.float32))


@pytest.mark.parametrize("kind", KINDS)
def test_inject_finds_nested_projections_and_fit_trains_only_adapters(kind):
    backbone = _backbone(kind)
    x = _inputs()
    before = backbone(x).numpy()
    target = ATTENTION[kind].format(r"\d", "(query|value)")
    model, adapted = tf_lora.inject_lora(backbone, rank=4, alpha=8, target=target, copy=False)
    assert model is backbone
    assert adapted == sorted(ATTENTION[kind].format(i, p) for i in (0, 1) for p in ("query", "value"))
    layers = tf_lora.layers.lora_layers(model)
    assert sorted(layers) == adapted
    assert all(type(layer) is tf_lora.layers.LoraEinsumDense for layer in layers.values())
    np.testing.assert_array_equal(model(x).numpy(), before)  # B = 0: the same model
    assert {w.path.rsplit("/", 1)[-1] for w in model.trainable_weights} == {"lora_a", "lora_b"}
    assert len(model.trainable_weights) == 2 * len(adapted)
    frozen = {w.path: w.numpy() for w in model.non_trainable_weights}
    y = np.random.default_rng(2).standard_normal(before.shape).astype(np.float32)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    model.fit(x, y, epochs=3, verbose=0)
    for w in model.non_trainable_weights:
        np.testing.assert_array_equal(w.numpy(), frozen[w.path])
    assert np.abs(model(x).numpy() - before).max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_merge_keras_round_trip_in_a_fresh_process_and_merge_and_unload(kind, tmp_path, run_python):
    backbone = _backbone(kind)
    x = _inputs()
    model, _ = tf_lora.inject_lora(backbone, rank=4, alpha=8, rank_pattern={"query": 2}, copy=False)
    layers = tf_lora.layers.lora_layers(model)
    assert layers[ATTENTION[kind].format(0, "query")].rank == 2
    assert layers[ATTENTION[kind].format(0, "key")].rank == 4
    assert any(type(layer) is tf_lora.layers.LoraDense for layer in layers.values()) == (kind != "gemma")
    _randomize_adapters(model, 3)
    y = model(x).numpy()
    tf_lora.layers.merge(model)
    assert all(layer.merged for layer in layers.values())
    np.testing.assert_allclose(model(x).numpy(), y, rtol=1e-4, atol=1e-4)
    tf_lora.layers.unmerge(model)
    y = model(x).numpy()  # the kernels after merge and unmerge, within rounding of before
    model.save(tmp_path / "lora.keras")
    np.save(tmp_path / "x.npy", x["token_ids"])
    np.save(tmp_path / "mask.npy", x["padding_mask"])
    trainable = sorted(w.path for w in model.trainable_weights)
    out = run_python(
        SOURCE
        + f"""
import json, tf_lora
model = keras.saving.load_model("{tmp_path}/lora.keras")
x = {{"token_ids": np.load("{tmp_path}/x.npy"), "padding_mask": np.load("{tmp_path}/mask.npy")}}
np.save("{tmp_path}/y.npy", model(x).numpy())
layers = tf_lora.layers.lora_layers(model)
print(json.dumps({{"layers": {{p: [type(l).__name__, l.rank] for p, l in layers.items()}},
                  "trainable": sorted(w.path for w in model.trainable_weights)}}))
"""
    )
    report = json.loads(out.strip().splitlines()[-1])
    assert report["trainable"] == trainable
    assert report["layers"] == {p: [type(layer).__name__, layer.rank] for p, layer in layers.items()}
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), y, rtol=1e-6, atol=1e-6)

    plain = tf_lora.merge_and_unload(model)
    assert plain is model and not tf_lora.layers.lora_layers(model)
    kinds = {type(layer) for layer in tf_lora.layers.model_layers.layers_by_path(model).values()}
    assert not any(issubclass(k, tf_lora.layers.LoraAdapters) for k in kinds)
    assert type(model) is type(_backbone(kind))
    np.testing.assert_allclose(model(x).numpy(), y, rtol=1e-4, atol=1e-4)
    model.save(tmp_path / "plain.keras")
    run_python(  # no tf_lora in this process
        SOURCE
        + f"""
import sys
model = keras.saving.load_model("{tmp_path}/plain.keras")
x = {{"token_ids": np.load("{tmp_path}/x.npy"), "padding_mask": np.load("{tmp_path}/mask.npy")}}
np.save("{tmp_path}/y_plain.npy", model(x).numpy())
assert "tf_lora" not in sys.modules
"""
    )
    np.testing.assert_allclose(np.load(tmp_path / "y_plain.npy"), y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_per_example_adapters_reach_every_layer_in_one_pass(kind):
    model, adapted = tf_lora.inject_lora(_backbone(kind), rank=4, alpha=8, copy=True)
    for layer in tf_lora.layers.lora_layers(model).values():
        layer.add_adapter("second", rank=2, alpha=2)
    _randomize_adapters(model, 4)
    _randomize_adapters(model, 5, "second")
    x = _inputs(batch=3)
    alone = {}
    for name in ("default", "second", None):
        tf_lora.set_active_adapter(model, name)
        alone[name] = model(x).numpy()
    assert np.abs(alone["default"] - alone["second"]).max() > 1e-2
    with tf_lora.layers.adapter_ids([1, -1, 0]):
        mixed = model(x).numpy()
    serve = tf.function(lambda x, ids: _with_ids(model, x, ids))
    traced = serve(x, tf.constant([0, 1, 1])).numpy()
    for row, name in enumerate(("second", None, "default")):
        np.testing.assert_allclose(mixed[row], alone[name][row], rtol=1e-4, atol=1e-4)
    for row, name in enumerate(("default", "second", "second")):
        np.testing.assert_allclose(traced[row], alone[name][row], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="no LoRA layer holds adapter 'nope'"):
        tf_lora.set_active_adapter(model, "nope")


def _with_ids(model, x, ids):
    with tf_lora.layers.adapter_ids(ids):
        return model(x)


def test_export_serves_with_the_adapters(tmp_path, run_python):
    model, _ = tf_lora.inject_lora(_backbone("gpt2"), rank=4, alpha=8, copy=False)
    _randomize_adapters(model, 6)
    x = _inputs()
    y = model(x).numpy()
    model.export(str(tmp_path / "export"), verbose=False)
    np.save(tmp_path / "x.npy", x["token_ids"])
    np.save(tmp_path / "mask.npy", x["padding_mask"])
    run_python(
        f"""
import numpy as np, tensorflow as tf, tf_lora
served = tf.saved_model.load("{tmp_path}/export")
x = {{"token_ids": np.load("{tmp_path}/x.npy"), "padding_mask": np.load("{tmp_path}/mask.npy")}}
np.save("{tmp_path}/y.npy", served.serve(x).numpy())
"""
    )
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), y, rtol=1e-5, atol=1e-5)


def test_errors_list_what_can_be_matched():
    backbone = _backbone("gpt2")
    with pytest.raises(
        ValueError, match=r"no Dense, EinsumDense or Embedding layer matches 'q_proj' \(they are, by path: "
    ):
        tf_lora.inject_lora(backbone, target="q_proj")
    with pytest.raises(ValueError, match="transformer_layer_0/self_attention/query"):
        tf_lora.inject_lora(backbone, target="q_proj")
    with pytest.raises(ValueError, match=r"\['layer_norm'\] are other layers"):
        tf_lora.inject_lora(backbone, target=["query", "layer_norm"])
    assert not tf_lora.layers.lora_layers(backbone)  # nothing changed
    model, adapted = tf_lora.inject_lora(backbone, target=["query"])  # a name: every layer of that name
    assert adapted == ["transformer_layer_0/self_attention/query", "transformer_layer_1/self_attention/query"]


@pytest.mark.parametrize("kind", ["llama", "gemma"])
def test_mixed_precision_fit(kind):
    """Trained as users train: mixed_float16 (Keras wraps the optimizer in a LossScaleOptimizer); the
    adapters stay float32, learn, and the base stays frozen."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model, _ = tf_lora.inject_lora(_backbone(kind), rank=4, alpha=8, copy=False)
        layer = tf_lora.layers.lora_layers(model)[ATTENTION[kind].format(0, "query")]
        assert layer.compute_dtype == "float16" and layer.adapter_slot().a.dtype == "float32"
        x = _inputs()
        y = np.random.default_rng(3).standard_normal(model(x).shape).astype(np.float32)
        frozen = {w.path: w.numpy() for w in model.non_trainable_weights}
        b = layer.adapter_slot().b.numpy()
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
        history = model.fit(x, y, epochs=3, verbose=0)
        assert np.all(np.isfinite(history.history["loss"]))
        assert history.history["loss"][-1] < history.history["loss"][0]
        assert not np.array_equal(layer.adapter_slot().b.numpy(), b)
        for w in model.non_trainable_weights:
            np.testing.assert_array_equal(w.numpy(), frozen[w.path])
    finally:
        keras.mixed_precision.set_global_policy("float32")
