"""PEFT adapters trained on Hugging Face transformers models apply to the keras-hub models with no user code,
and reproduce transformers + PEFT's logits; adapters on keras-hub models export as the same PEFT files.

The fixtures (tests/adapters/make_hf_fixtures.py) are tiny GPT-2, Llama (grouped-query attention) and Gemma
models with random weights, PEFT adapters on every projection (GPT-2's fused c_attn included) and the logits
transformers + PEFT computed."""

import json
import pathlib

import keras
import numpy as np
import pytest
from safetensors.numpy import load_file

import tf_lora

keras_hub = pytest.importorskip("keras_hub")

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"
BACKBONES = {"gpt2": "GPT2Backbone", "llama": "LlamaBackbone", "gemma": "GemmaBackbone"}
ARCHS = list(BACKBONES)


def _backbone(arch):
    return getattr(keras_hub.models, BACKBONES[arch]).from_preset(str(FIXTURES / arch / "base"))


def _logits(model, ids):
    backbone = model if isinstance(model, keras_hub.models.Backbone) else model.backbone
    hidden = model({"token_ids": ids, "padding_mask": np.ones_like(ids)})
    return backbone.token_embedding(hidden, reverse=True).numpy()


@pytest.mark.parametrize("mode", ["attach", "merge"])
@pytest.mark.parametrize("arch", ARCHS)
def test_peft_adapter_reproduces_transformers_logits(arch, mode):
    io = load_file(str(FIXTURES / arch / "io.safetensors"))
    backbone = _backbone(arch)
    base = _logits(backbone, io["ids"])
    np.testing.assert_allclose(base, io["base_logits"], atol=1e-5)  # keras-hub's own conversion gap
    adapters = tf_lora.adapters.load_peft(FIXTURES / arch / "adapter")
    report = tf_lora.adapters.apply(backbone, adapters, mode=mode)
    assert not report.unmatched_modules and not report.layers_without_adapter
    layers = {"gpt2": 12, "llama": 15, "gemma": 14}[arch]  # Llama's file also adapts its embedding table
    assert len(set(report.applied.values())) == layers
    logits = _logits(backbone, io["ids"])
    assert np.abs(io["lora_logits"] - io["base_logits"]).max() > 0.3  # the adapter matters
    np.testing.assert_allclose(logits, io["lora_logits"], atol=1e-4)
    if mode == "attach":
        assert len(tf_lora.layers.lora_layers(backbone)) == layers


def test_peft_adapter_on_a_task_model():
    """The backbone inside a CausalLM task model is found too (its layers' paths start with its name)."""
    arch = "gpt2"
    io = load_file(str(FIXTURES / arch / "io.safetensors"))
    causal_lm = keras_hub.models.GPT2CausalLM(backbone=_backbone(arch), preprocessor=None)
    report = tf_lora.adapters.apply(causal_lm, tf_lora.adapters.load_peft(FIXTURES / arch / "adapter"))
    path = f"{causal_lm.backbone.name}/transformer_layer_0/self_attention/query"
    assert report.applied["transformer.h.0.attn.c_attn:query"] == path
    logits = causal_lm({"token_ids": io["ids"], "padding_mask": np.ones_like(io["ids"])}).numpy()
    np.testing.assert_allclose(logits, io["lora_logits"], atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_export_gives_back_peft_files(arch, tmp_path):
    """apply then from_model + save_peft writes what PEFT wrote: the same module names and tensors (GPT-2's
    three query/key/value adapters fused back into c_attn), so PEFT loads them onto the transformers model."""
    backbone = _backbone(arch)
    tf_lora.adapters.apply(backbone, tf_lora.adapters.load_peft(FIXTURES / arch / "adapter"))
    exported = tf_lora.adapters.from_model(backbone)
    out = tmp_path / "not" / "yet" / "out"  # save_peft makes the parent directories
    tf_lora.adapters.save_peft(exported, out)
    ours = load_file(str(out / "adapter_model.safetensors"))
    theirs = load_file(str(FIXTURES / arch / "adapter" / "adapter_model.safetensors"))
    # PEFT also saves the table of an adapted embedding (save_embedding_layers); the adapters are the same.
    theirs = {k: v for k, v in theirs.items() if not k.endswith("embed_tokens.base_layer.weight")}
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        np.testing.assert_allclose(ours[key], value, rtol=1e-6, atol=1e-7, err_msg=key)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] == (arch == "gpt2")
    reloaded = _backbone(arch)
    tf_lora.adapters.apply(reloaded, tf_lora.adapters.load_peft(out))
    io = load_file(str(FIXTURES / arch / "io.safetensors"))
    np.testing.assert_allclose(_logits(reloaded, io["ids"]), io["lora_logits"], atol=1e-4)


def test_keras_trained_gpt2_adapters_fuse_into_c_attn_exactly(tmp_path):
    """Adapters trained in Keras on query, key and value separately (different a, ranks and scales, value
    left out) fuse into one c_attn adapter whose update on the [in, 3 * hidden] weight is exactly theirs."""
    backbone = _backbone("gpt2")
    tf_lora.inject_lora(
        backbone,
        rank=4,
        alpha=8,
        target=r".*(query|key)",
        rank_pattern={"key": 2},
        alpha_pattern={"key": 3},
        copy=False,
    )
    rng = np.random.default_rng(0)
    for layer in tf_lora.layers.lora_layers(backbone).values():
        layer.adapter_slot().b.assign(rng.standard_normal(layer.adapter_slot().b.shape).astype(np.float32))
    exported = tf_lora.adapters.from_model(backbone)
    fused = exported["transformer.h.0.attn.c_attn"]
    assert fused.rank == 6
    layers = tf_lora.layers.lora_layers(backbone)
    update = fused.scale * fused.a @ fused.b
    hidden = 32
    for i, name in enumerate(("query", "key")):
        slot = layers[f"transformer_layer_0/self_attention/{name}"].adapter_slot()
        expected = slot.scale * slot.a.numpy() @ slot.b.numpy()
        np.testing.assert_allclose(update[:, i * hidden : (i + 1) * hidden], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(update[:, 2 * hidden :], 0)
    io = load_file(str(FIXTURES / "gpt2" / "io.safetensors"))
    expected = _logits(backbone, io["ids"])
    tf_lora.adapters.save_peft(exported, tmp_path / "out")
    reloaded = _backbone("gpt2")
    tf_lora.adapters.apply(reloaded, tf_lora.adapters.load_peft(tmp_path / "out"), mode="merge")
    np.testing.assert_allclose(_logits(reloaded, io["ids"]), expected, atol=1e-4)


def test_keras_trained_gpt2_biases_fuse_into_c_attn_whatever_the_adapters(tmp_path):
    """Query and key trained with their biases (train_bias; separate adapters, value left out) export with
    bias="lora_only": c_attn's bias is the three biases side by side (value's its layer's own), exact."""
    backbone = _backbone("gpt2")
    tf_lora.inject_lora(backbone, rank=2, alpha=4, target=r".*(query|key)", train_bias=True, copy=False)
    rng = np.random.default_rng(1)
    for layer in tf_lora.layers.lora_layers(backbone).values():
        layer.adapter_slot().b.assign(
            3 * rng.standard_normal(layer.adapter_slot().b.shape).astype(np.float32)
        )
        layer.bias.assign(layer.bias.numpy() + 3 * rng.standard_normal(layer.bias.shape).astype(np.float32))
    exported = tf_lora.adapters.from_model(backbone, bias="lora_only")
    fused = exported["transformer.h.0.attn.c_attn"]
    value = tf_lora.layers.model_layers.layers_by_path(backbone)["transformer_layer_0/self_attention/value"]
    assert fused.rank == 4
    np.testing.assert_array_equal(fused.bias[64:], value.bias.numpy().reshape(-1))
    for i, name in enumerate(("query", "key")):
        layer = tf_lora.layers.lora_layers(backbone)[f"transformer_layer_0/self_attention/{name}"]
        np.testing.assert_array_equal(fused.bias[i * 32 : (i + 1) * 32], layer.bias.numpy().reshape(-1))
    io = load_file(str(FIXTURES / "gpt2" / "io.safetensors"))
    expected = _logits(backbone, io["ids"])
    tf_lora.adapters.save_peft(exported, tmp_path / "out")
    reloaded = _backbone("gpt2")
    tf_lora.adapters.apply(reloaded, tf_lora.adapters.load_peft(tmp_path / "out"))
    base = _logits(_backbone("gpt2"), io["ids"])
    assert np.abs(expected - base).max() > 3e-3  # query and key move the attention: far above rounding
    np.testing.assert_allclose(_logits(reloaded, io["ids"]), expected, atol=1e-5)


def test_unknown_names_on_a_keras_hub_model_list_its_layers():
    backbone = _backbone("llama")
    adapters = tf_lora.adapters.load_peft(FIXTURES / "llama" / "adapter")
    renamed = {m.replace("q_proj", "query_projection"): a for m, a in adapters.items()}
    with pytest.raises(
        ValueError,
        match=r"modules that match no layer: \[.*query_projection.*transformer_layer_0/self_attention/query",
    ):
        tf_lora.adapters.apply(backbone, renamed)
    assert not tf_lora.layers.lora_layers(backbone)
    assert keras.ops.all(backbone.weights[0] == _backbone("llama").weights[0])


@pytest.mark.parametrize("mode", ["attach", "merge"])
def test_peft_dora_adapter_on_gpt2_conv1d_reproduces_transformers_logits(mode, tmp_path):
    """DoRA trained on GPT-2 (Conv1D layers, fan_in_fan_out; the fused c_attn's magnitudes split with it)."""
    io = load_file(str(FIXTURES / "gpt2_dora" / "io.safetensors"))
    adapters = tf_lora.adapters.load_peft(FIXTURES / "gpt2_dora" / "adapter")
    assert all(adapter.use_dora for adapter in adapters.values())
    backbone = _backbone("gpt2")
    tf_lora.adapters.apply(backbone, adapters, mode=mode)
    np.testing.assert_allclose(_logits(backbone, io["ids"]), io["lora_logits"], atol=1e-4)
    if mode == "attach":  # and back to the same PEFT file
        tf_lora.adapters.save_peft(tf_lora.adapters.from_model(backbone), tmp_path / "out")
        ours = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
        theirs = load_file(str(FIXTURES / "gpt2_dora" / "adapter" / "adapter_model.safetensors"))
        assert sorted(ours) == sorted(theirs)
        for key, value in theirs.items():
            np.testing.assert_allclose(ours[key], value, rtol=1e-6, atol=1e-7, err_msg=key)


@pytest.mark.parametrize("mode", ["attach", "merge"])
def test_qwen3_adapters_map_by_their_llama_names(mode, tmp_path):
    """Qwen3 names its modules as Llama does; keras-hub's own conversion of it is 1e-4 off transformers, so
    the adapter's effect on the logits (LoRA minus base, on each side) is what is compared."""
    io = load_file(str(FIXTURES / "qwen3" / "io.safetensors"))
    backbone = keras_hub.models.Qwen3Backbone.from_preset(str(FIXTURES / "qwen3" / "base"))
    base = _logits(backbone, io["ids"])
    report = tf_lora.adapters.apply(
        backbone, tf_lora.adapters.load_peft(FIXTURES / "qwen3" / "adapter"), mode=mode
    )
    assert not report.unmatched_modules and len(report.applied) == 14
    effect, theirs = _logits(backbone, io["ids"]) - base, io["lora_logits"] - io["base_logits"]
    assert np.abs(theirs).max() > 0.3
    np.testing.assert_allclose(effect, theirs, atol=3e-4)  # within the base conversion gap
    if mode == "attach":  # and back to the same PEFT files
        tf_lora.adapters.save_peft(tf_lora.adapters.from_model(backbone), tmp_path / "out")
        ours = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
        theirs_file = load_file(str(FIXTURES / "qwen3" / "adapter" / "adapter_model.safetensors"))
        assert sorted(ours) == sorted(theirs_file)
        for key, value in theirs_file.items():
            np.testing.assert_allclose(ours[key], value, rtol=1e-6, atol=1e-7, err_msg=key)
