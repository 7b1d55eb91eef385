"""The TensorFlow half of checking that adapters trained in Keras load in Hugging Face PEFT (not needed by
CI): puts LoRA (random, non-zero) on the keras-hub models built from the HF fixtures' base weights, exports
it with `from_model` + `save_peft` under Hugging Face names, and writes the keras-hub logits beside it.

    .venv/bin/python tests/adapters/make_keras_exports.py /tmp/kexport
    /tmp/torchvenv/bin/python tests/adapters/make_hf_fixtures.py --check ARCH /tmp/kexport/ARCH

(run 2026-11-29: max |PEFT logits - tf_lora logits| 2.3e-7 GPT-2, 6.9e-7 Llama with its embedding table
adapted, 8.6e-7 Gemma).
"""

import pathlib
import sys

import keras_hub
import numpy as np
from safetensors.numpy import load_file, save_file

import tf_lora

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"
BACKBONES = {"gpt2": "GPT2Backbone", "llama": "LlamaBackbone", "gemma": "GemmaBackbone"}


def export(arch, out):
    backbone = getattr(keras_hub.models, BACKBONES[arch]).from_preset(str(FIXTURES / arch / "base"))
    tf_lora.inject_lora(
        backbone, rank=4, alpha=8, rank_pattern={"key": 2}, alpha_pattern={"value": 3}, copy=False
    )
    if arch == "llama":  # its input table is untied: LoRA on it too
        tf_lora.inject_lora(backbone, rank=4, alpha=8, target=["token_embedding"], copy=False)
    rng = np.random.default_rng(0)
    for layer in tf_lora.layers.lora_layers(backbone).values():
        slot = layer.adapter_slot()
        slot.b.assign(0.3 * rng.standard_normal(slot.b.shape).astype("float32"))
    ids = load_file(str(FIXTURES / arch / "io.safetensors"))["ids"]
    hidden = backbone({"token_ids": ids, "padding_mask": np.ones_like(ids)})
    logits = backbone.token_embedding(hidden, reverse=True).numpy()
    tf_lora.adapters.save_peft(tf_lora.adapters.from_model(backbone), out / arch, overwrite=True)
    save_file({"ids": ids, "logits": logits}, str(out / arch / "expected.safetensors"))


if __name__ == "__main__":
    for name in BACKBONES:
        export(name, pathlib.Path(sys.argv[1]))
