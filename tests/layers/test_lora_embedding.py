"""LoraEmbedding: LoRA on an embedding table as PEFT defines it, against PEFT's own files and outputs
(tests/adapters/make_peft_fixtures.py, fixture peft_embedding), numpy, and keras-hub's tied tables."""

import pathlib
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras_hub_models import tiny_backbone
from safetensors.numpy import load_file

import tf_lora

FIXTURE = pathlib.Path(__file__).parent.parent / "adapters" / "fixtures" / "peft_embedding"


def _tiny(fixture=FIXTURE):
    """PEFT's fixture model in Keras: out(relu(q(emb(ids)))), base weights from the fixture."""
    base = load_file(str(fixture / "base.safetensors"))
    ids = keras.Input((3,), dtype="int32")
    emb, q, out = (
        keras.layers.Embedding(20, 8, name="emb"),
        keras.layers.Dense(6, name="q"),
        keras.layers.Dense(4, name="out"),
    )
    model = keras.Model(ids, out(keras.layers.ReLU()(q(emb(ids)))))
    emb.embeddings.assign(base["emb.weight"])
    for name, layer in (("q", q), ("out", out)):
        layer.kernel.assign(base[f"{name}.weight"].T)
        layer.bias.assign(base[f"{name}.bias"])
    return model


@pytest.mark.parametrize("name", ["peft_embedding", "peft_dora_embedding"])
@pytest.mark.parametrize("mode", ["attach", "merge"])
def test_peft_embedding_adapter_gives_peft_output(mode, name, tmp_path):
    # peft_dora_embedding: DoRA on the table and on q; attached, the table's DoRA was run as plain LoRA.
    fixture = FIXTURE.parent / name
    adapters = tf_lora.adapters.load_peft(fixture)
    assert adapters["emb"].metadata["embedding"] and adapters["emb"].a.shape == (20, 2)
    assert adapters["emb"].use_dora == (name == "peft_dora_embedding")
    model = _tiny(fixture)
    tf_lora.adapters.apply(model, adapters, mode=mode)
    io = load_file(str(fixture / "io.safetensors"))
    np.testing.assert_allclose(model(io["x"]).numpy(), io["y"], rtol=1e-5, atol=1e-5)
    if mode == "attach":  # and after a .keras round trip
        model.save(tmp_path / "m.keras")
        loaded = keras.saving.load_model(tmp_path / "m.keras")
        assert loaded.get_layer("emb").use_dora == adapters["emb"].use_dora
        np.testing.assert_allclose(loaded(io["x"]).numpy(), io["y"], rtol=1e-5, atol=1e-5)
    if mode == "merge":
        merged = load_file(str(fixture / "merged.safetensors"))
        np.testing.assert_allclose(
            model.get_layer("emb").embeddings.numpy(), merged["emb.weight"], rtol=1e-5, atol=1e-6
        )
        return
    assert type(model.get_layer("emb")) is tf_lora.layers.LoraEmbedding
    tf_lora.layers.merge(model)
    np.testing.assert_allclose(model(io["x"]).numpy(), io["y"], rtol=1e-5, atol=1e-5)
    tf_lora.layers.unmerge(model)
    tf_lora.adapters.save_peft(tf_lora.adapters.from_model(model), tmp_path / "out")
    ours = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    theirs = load_file(str(fixture / "adapter_model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        np.testing.assert_allclose(ours[key], value, rtol=1e-5, atol=1e-7, err_msg=key)


def test_per_example_adapters_gradients_and_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    ids = keras.Input((4,), dtype="int32")
    layer = tf_lora.layers.LoraEmbedding(10, 6, rank=2, alpha=4, name="emb")
    model = keras.Model(ids, layer(ids))
    layer.add_adapter("other", rank=3, alpha=3)
    for name in layer.adapter_names:
        slot = layer.adapter_slot(name)
        slot.b.assign(rng.standard_normal(slot.b.shape).astype(np.float32))
    tokens = rng.integers(0, 10, (3, 4)).astype(np.int32)
    table = layer.embeddings.numpy()

    def expected(name):
        slot = layer.adapter_slot(name)
        return table[tokens] + slot.scale * slot.a.numpy()[tokens] @ slot.b.numpy()

    np.testing.assert_allclose(layer(tokens).numpy(), expected("default"), rtol=1e-5, atol=1e-5)
    mixed = layer(tokens, adapter_ids=[1, -1, 0]).numpy()
    np.testing.assert_allclose(mixed[0], expected("other")[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mixed[1], table[tokens][1], rtol=1e-6)
    np.testing.assert_allclose(mixed[2], expected("default")[2], rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="adapter ids must be < 2"):
        layer(tokens, adapter_ids=[2, 0, 0])
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(tokens) ** 2)
    da, db = tape.gradient(loss, [layer.adapter_slot().a, layer.adapter_slot().b])
    a, b = tf.Variable(layer.adapter_slot().a.numpy()), tf.Variable(layer.adapter_slot().b.numpy())
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum((table[tokens] + 2.0 * tf.gather(a, tokens) @ b) ** 2)
    ea, eb = tape.gradient(loss, [a, b])
    np.testing.assert_allclose(
        tf.convert_to_tensor(da).numpy(), tf.convert_to_tensor(ea).numpy(), rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(db.numpy(), eb.numpy(), rtol=1e-4, atol=1e-4)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(loaded(tokens).numpy(), model(tokens).numpy())
    assert loaded.get_layer("emb").adapter_names == ["default", "other"]


def test_keras_hub_tied_table_keeps_its_base_output_projection_until_merged():
    pytest.importorskip("keras_hub")
    backbone = tiny_backbone("gpt2", num_layers=1)
    x = {"token_ids": np.arange(8, dtype="int32")[None], "padding_mask": np.ones((1, 8), "int32")}
    before = backbone(x).numpy()
    _, adapted = tf_lora.inject_lora(backbone, target=["query"], copy=False)
    _, adapted = tf_lora.inject_lora(backbone, target=["token_embedding"], copy=False)  # a second call
    assert adapted == ["token_embedding"]
    trained = {w.path for w in backbone.trainable_weights}  # the first call's adapters still train
    assert trained == {
        "token_embedding/lora_a",
        "token_embedding/lora_b",
        "transformer_layer_0/self_attention/query/lora_a",
        "transformer_layer_0/self_attention/query/lora_b",
    }
    table = backbone.token_embedding
    assert (
        isinstance(table, tf_lora.layers.LoraEmbedding) and type(table).__name__ == "LoraReversibleEmbedding"
    )
    np.testing.assert_array_equal(backbone(x).numpy(), before)
    slot = table.adapter_slot()
    slot.b.assign(np.random.default_rng(1).standard_normal(slot.b.shape).astype(np.float32))
    hidden = np.random.default_rng(2).standard_normal((1, 3, 16)).astype(np.float32)
    base_logits = hidden @ table.embeddings.numpy().T
    np.testing.assert_allclose(table(hidden, reverse=True).numpy(), base_logits, rtol=1e-5, atol=1e-5)
    assert np.abs(backbone(x).numpy() - before).max() > 1e-3  # the lookup is adapted
    with pytest.warns(UserWarning, match="tied embedding table also changes the output projection"):
        table.merge()
    merged_table = table.embeddings.numpy()
    np.testing.assert_allclose(
        table(hidden, reverse=True).numpy(), hidden @ merged_table.T, rtol=1e-5, atol=1e-5
    )


def test_merging_an_untied_table_does_not_warn():
    layer = tf_lora.layers.LoraEmbedding(10, 4, rank=2)
    layer(tf.constant([[1, 2]]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.merge()
    assert layer.merged


def test_apply_merge_into_a_tied_table_warns_as_merge_does():
    pytest.importorskip("keras_hub")
    vocab, hidden = tiny_backbone("gpt2", num_layers=1).token_embedding.embeddings.shape
    rng = np.random.default_rng(3)
    adapter = tf_lora.adapters.Adapter(
        a=rng.standard_normal((vocab, 2)).astype(np.float32),
        b=rng.standard_normal((2, hidden)).astype(np.float32),
        alpha=2.0,
        module="token_embedding",
    )
    backbone = tiny_backbone("gpt2", num_layers=1)
    base = backbone.token_embedding.embeddings.numpy()
    adapters = tf_lora.adapters.AdapterSet({"token_embedding": adapter})
    with pytest.warns(UserWarning, match="apply: token_embedding -> token_embedding: merging into a tied"):
        tf_lora.adapters.apply(backbone, adapters, mode="merge")
    np.testing.assert_allclose(
        backbone.token_embedding.embeddings.numpy(), base + adapter.a @ adapter.b, rtol=1e-5, atol=1e-5
    )
    untied = _tiny()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tf_lora.adapters.apply(untied, tf_lora.adapters.load_peft(FIXTURE), mode="merge")
