"""Writes tests/adapters/fixtures/hf/: tiny Hugging Face transformers models (random weights, built from
configs) with PEFT LoRA adapters trained-looking (random, non-zero), and the logits transformers computes
for them. Not needed by CI (the files are committed); run in a scratch venv:

    python -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch transformers peft safetensors
    /tmp/torchvenv/bin/python tests/adapters/make_hf_fixtures.py

Each `<arch>/` holds `base/` (config.json + model.safetensors, as `save_pretrained` writes: keras-hub loads
it with `from_preset`), `adapter/` (PEFT's `save_pretrained`), and `io.safetensors`: token ids, the base
model's logits and the logits with the adapter, from transformers + PEFT. `gpt2_dora/` is a DoRA adapter on
gpt2/'s base (no base/ of its own); `llama_mts/` and `gpt2_mts/` save whole layers beside the adapters
(`modules_to_save`: Llama's embedding table and down_proj, GPT-2's fused c_attn Conv1D), trained-looking;
`qwen3/` a Qwen3 model (Llama's module names) with an adapter on every projection.
Made 2026-11-29 with torch 2.14.1, transformers 5.24.0, peft 0.21.2.

`--check ARCH DIR` loads a PEFT directory that tf_lora wrote for ARCH's base model with PEFT and prints the
largest difference between its logits and those in DIR/expected.safetensors.
"""

import os
import sys

import peft
import torch
import transformers
from safetensors.torch import load_file, save_file

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "hf")
VOCAB = 128


def _config(arch):
    if arch == "gpt2":
        return transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4, activation_function="gelu_new"
        ), ["c_attn", "c_proj", "c_fc"]
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention
        max_position_embeddings=64,
    )
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if arch == "llama":  # and LoRA on the (untied) input embedding table
        return transformers.LlamaConfig(**common, tie_word_embeddings=False), [*targets, "embed_tokens"]
    if arch == "qwen3":  # Llama's names, with query/key norms; keras-hub's conversion is 1e-4 off here
        return transformers.Qwen3Config(**common, head_dim=8, tie_word_embeddings=False), targets
    return transformers.GemmaConfig(**common, head_dim=8, hidden_activation="gelu_pytorch_tanh"), targets


def _model(arch):
    config, targets = _config(arch)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms away from 1 and biases away from 0, so a layout mistake shows
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model, targets


# Whole layers saved beside the adapters (modules_to_save), and the adapters' targets then.
_SAVED = {"llama": (["embed_tokens", "down_proj"], ["q_proj", "v_proj"]), "gpt2": (["c_attn"], ["c_fc"])}


def make(arch, use_dora=False, saved=False):
    path = os.path.join(HERE, arch + ("_dora" if use_dora else "") + ("_mts" if saved else ""))
    model, targets = _model(arch)
    if not use_dora and not saved:  # the variants share their architecture's base/ (the same seed)
        model.save_pretrained(os.path.join(path, "base"))
    modules_to_save = None
    if saved:
        modules_to_save, targets = _SAVED[arch]
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=targets,
        rank_pattern={targets[0]: 2},
        init_lora_weights=False,  # random A and B: a non-zero adapter
        fan_in_fan_out=arch == "gpt2",  # GPT-2's Conv1D
        use_dora=use_dora,
        modules_to_save=modules_to_save,
    )
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_logits = model(ids).logits
        lora = peft.get_peft_model(model, config)
        for name, p in lora.named_parameters():  # PEFT's random init is small; make the adapter matter
            if "lora_B" in name:
                p.mul_(20.0)
            if "lora_embedding" in name:
                p.copy_(0.5 * torch.randn_like(p))
            if "lora_magnitude" in name:  # a trained magnitude, away from the weight's own norms
                p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
            if "modules_to_save" in name:  # a trained copy of the whole layer
                p.add_(0.2 * torch.randn_like(p))
        lora.save_pretrained(os.path.join(path, "adapter"))
        lora_logits = lora(ids).logits
    save_file(
        {"ids": ids.to(torch.int32), "base_logits": base_logits, "lora_logits": lora_logits},
        os.path.join(path, "io.safetensors"),
    )
    os.remove(os.path.join(path, "adapter", "README.md"))  # PEFT's model card template
    print(path, "adapter moved logits by", float((lora_logits - base_logits).abs().max()))


def check(arch, directory):
    model = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(HERE, arch, "base")).eval()
    lora = peft.PeftModel.from_pretrained(model, directory).eval()
    expected = load_file(os.path.join(directory, "expected.safetensors"))
    with torch.no_grad():
        logits = lora(expected["ids"].long()).logits
    print(float((logits - expected["logits"]).abs().max()))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--check":
        check(sys.argv[2], sys.argv[3])
    else:
        for arch in ("gpt2", "llama", "gemma"):
            make(arch)
        make("gpt2", use_dora=True)  # DoRA on GPT-2's Conv1D (fan_in_fan_out), fused c_attn included
        make("llama", saved=True)
        make("gpt2", saved=True)
        make("qwen3")
