"""Whole layers saved beside PEFT adapters (`modules_to_save`) on keras-hub models, both ways, against files
and logits made by transformers + PEFT (tests/adapters/make_hf_fixtures.py: `llama_mts`, Llama's embedding
table and down_proj; `gpt2_mts`, GPT-2's fused c_attn Conv1D): loading maps their Hugging Face names onto
the keras-hub layers and each weight from the file's layout (a Linear's [out, in], a table's [vocab, dim],
a Conv1D's [in, out]); exporting writes them back under the Hugging Face names in that layout, GPT-2's
query, key and value fused into c_attn, key for key what PEFT wrote."""

import json

import keras
import numpy as np
import pytest
from safetensors.numpy import load_file
from test_hf_keras_hub import FIXTURES, _backbone, _logits

import tf_lora

pytest.importorskip("keras_hub")

# arch -> the keras-hub layers PEFT's modules_to_save replaced in the fixture
SAVED = {
    "llama": ["token_embedding"] + [f"transformer_layer_{i}/feedforward_output_dense" for i in range(2)],
    "gpt2": [
        f"transformer_layer_{i}/self_attention/{p}" for i in range(2) for p in ("query", "key", "value")
    ],
}


@pytest.mark.parametrize("mode", ["attach", "merge"])
@pytest.mark.parametrize("arch", sorted(SAVED))
def test_modules_to_save_load_onto_keras_hub_and_reproduce_peft(arch, mode):
    io = load_file(str(FIXTURES / f"{arch}_mts" / "io.safetensors"))
    backbone = _backbone(arch)
    np.testing.assert_allclose(_logits(backbone, io["ids"]), io["base_logits"], atol=1e-5)
    adapters = tf_lora.adapters.load_peft(FIXTURES / f"{arch}_mts" / "adapter")
    report = tf_lora.adapters.apply(backbone, adapters, mode=mode)
    assert not report.unmatched_modules
    assert sorted(report.replaced.values()) == sorted(SAVED[arch])
    assert np.abs(io["lora_logits"] - io["base_logits"]).max() > 0.3  # the file matters
    np.testing.assert_allclose(_logits(backbone, io["ids"]), io["lora_logits"], atol=1e-4)


@pytest.mark.parametrize("arch", sorted(SAVED))
def test_modules_to_save_export_as_peft_wrote_them(arch, tmp_path):
    backbone = _backbone(arch)
    tf_lora.adapters.apply(backbone, tf_lora.adapters.load_peft(FIXTURES / f"{arch}_mts" / "adapter"))
    exported = tf_lora.adapters.from_model(backbone, modules_to_save=SAVED[arch])
    tf_lora.adapters.save_peft(exported, tmp_path / "out")
    ours = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    theirs = load_file(str(FIXTURES / f"{arch}_mts" / "adapter" / "adapter_model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        np.testing.assert_allclose(ours[key], value, rtol=1e-6, atol=1e-6, err_msg=key)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert all(m.startswith(("model.", "transformer.")) for m in config["modules_to_save"])

    io = load_file(str(FIXTURES / f"{arch}_mts" / "io.safetensors"))
    reloaded = _backbone(arch)
    tf_lora.adapters.apply(reloaded, tf_lora.adapters.load_peft(tmp_path / "out"))
    np.testing.assert_allclose(_logits(reloaded, io["ids"]), io["lora_logits"], atol=1e-4)


def test_a_whole_layer_without_a_hugging_face_name_is_refused():
    """A classifier head on a keras-hub backbone has no transformers name: exported under its Keras path, PEFT
    would load the directory and silently keep its own head."""
    backbone = _backbone("llama")
    inputs = {name: keras.Input((None,), dtype="int32", name=name) for name in ("token_ids", "padding_mask")}
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(backbone(inputs)))
    tf_lora.inject_lora(model, rank=2, target=".*query", copy=False)
    with pytest.raises(ValueError, match="'head' has no Hugging Face module name.*mapping='paths'"):
        tf_lora.adapters.from_model(model, modules_to_save=["head"])
    exported = tf_lora.adapters.from_model(model, mapping="paths", modules_to_save=["head"])
    np.testing.assert_array_equal(
        exported.replacements["head"]["weight"], model.get_layer("head").kernel.numpy().T
    )


def test_gpt2_whole_weights_keep_their_conv1d_layout_whatever_the_targets(tmp_path):
    """PEFT sets fan_in_fan_out for its Conv1D LoRA targets only: a GPT-2 file that adapts the embedding and
    saves attn.c_proj whole holds that Conv1D weight [in, out] with fan_in_fan_out false. It loaded
    transposed (c_proj is square: silently)."""
    backbone = _backbone("gpt2")
    tf_lora.inject_lora(backbone, rank=2, target="token_embedding", copy=False)
    output = tf_lora.layers.model_layers.layers_by_path(backbone)[
        "transformer_layer_0/self_attention/attention_output"
    ]
    rng = np.random.default_rng(0)
    output.kernel.assign(output.kernel.numpy() + rng.standard_normal(output.kernel.shape).astype(np.float32))
    exported = tf_lora.adapters.from_model(
        backbone, modules_to_save=["transformer_layer_0/self_attention/attention_output"]
    )
    tf_lora.adapters.save_peft(exported, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["fan_in_fan_out"] is False
    written = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    matrix = tf_lora.layers.kernel_layout.kernel_matrix(output).numpy()  # [in, out]
    np.testing.assert_array_equal(
        written["base_model.model.transformer.h.0.attn.c_proj.weight"], matrix
    )  # Conv1D
    fresh = _backbone("gpt2")
    tf_lora.adapters.apply(fresh, tf_lora.adapters.load_peft(tmp_path / "out"))
    loaded = tf_lora.layers.model_layers.layers_by_path(fresh)[
        "transformer_layer_0/self_attention/attention_output"
    ]
    np.testing.assert_array_equal(tf_lora.layers.kernel_layout.kernel_matrix(loaded).numpy(), matrix)
