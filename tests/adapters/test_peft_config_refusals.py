"""PEFT LoRA configurations whose adapters tf_lora would compute wrongly are refused by load_peft, naming
the field, instead of loading as plain LoRA: base-changing initialisations saved unconverted (PiSSA, OLoRA,
CorDA, LoftQ, LoRA-GA: PEFT subtracts the initial adapter from the base weights when it creates the
adapter), activated LoRA, lora_bias and the other variants. The files are a real PEFT fixture with the one
config field PEFT writes for each (field names as in PEFT 0.21's LoraConfig)."""

import json
import pathlib
import shutil
import warnings

import numpy as np
import pytest

import tf_lora

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "peft_f32"


def _with(tmp_path, **fields):
    path = tmp_path / "adapter"
    shutil.copytree(FIXTURE, path)
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(fields)
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga"])
def test_base_changing_initialisations_are_refused(tmp_path, init):
    with pytest.raises(ValueError, match=rf"init_lora_weights '{init}' changes the base.*path_initial_model"):
        tf_lora.adapters.load_peft(_with(tmp_path, init_lora_weights=init))


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal", "mica"])
def test_initialisations_that_keep_the_base_load(tmp_path, init):
    adapters = tf_lora.adapters.load_peft(_with(tmp_path, init_lora_weights=init))
    reference = tf_lora.adapters.load_peft(FIXTURE)
    assert sorted(adapters) == sorted(reference)
    for module, adapter in adapters.items():
        np.testing.assert_array_equal(adapter.b, reference[module].b)


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("alora_invocation_tokens", [5, 6], "activated LoRA"),
        ("lora_bias", True, "lora_bias"),
        ("trainable_token_indices", [1, 2], "trainable_token_indices"),
        ("layer_replication", [[0, 1]], "layer_replication"),
        ("use_qalora", True, "use_qalora"),
        ("arrow_config", {"top_k": 2}, "arrow_config"),
    ],
)
def test_variants_tf_lora_does_not_compute_are_refused(tmp_path, field, value, named):
    with pytest.raises(ValueError, match=f"{named}.*which tf_lora does not compute"):
        tf_lora.adapters.load_peft(_with(tmp_path, **{field: value}))


def test_the_tied_table_warning_of_a_merge_names_the_table(tmp_path):
    """apply(mode="merge") warns about the tied embedding table it merges into, by its own module and path
    (it named the last module checked before)."""
    pytest.importorskip("keras_hub")
    from keras_hub_models import tiny_backbone  # noqa: PLC0415

    backbone = tiny_backbone("gemma")
    rng = np.random.default_rng(0)
    vocab, dim = backbone.token_embedding.embeddings.shape
    adapters = {
        "model.embed_tokens": tf_lora.adapters.Adapter(
            rng.standard_normal((vocab, 2)).astype(np.float32),
            rng.standard_normal((2, dim)).astype(np.float32),
            alpha=2.0,
            metadata={"embedding": True},
        ),
        "model.layers.1.self_attn.q_proj": tf_lora.adapters.Adapter(
            rng.standard_normal((dim, 2)).astype(np.float32),
            rng.standard_normal((2, 16)).astype(np.float32),
            alpha=2.0,
        ),
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tf_lora.adapters.apply(backbone, adapters, mode="merge")
    tied = [str(w.message) for w in caught if "tied" in str(w.message)]
    assert len(tied) == 1 and tied[0].startswith("apply: model.embed_tokens -> token_embedding"), tied


def test_a_pickled_adapter_says_what_it_is(tmp_path):
    path = _with(tmp_path)
    (path / "adapter_model.safetensors").rename(
        path / "adapter_model.bin"
    )  # what safe_serialization=False names
    with pytest.raises(ValueError, match="holds adapter_model.bin .*safe_serialization=True"):
        tf_lora.adapters.load_peft(path)
