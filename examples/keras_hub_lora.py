"""Second example: LoRA on a keras-hub transformer (GPT-2 built from a small config), end to end.

1. Build a GPT-2 causal language model from a config (random weights: nothing can be downloaded) and
   pretrain it briefly on sequences that count up by 1 (next token = token + 1).
2. Inject LoRA into every attention and feed-forward projection (`tf_lora.inject_lora`: the EinsumDense
   layers two levels down included; base frozen) and fine-tune on a new task, counting up by 3.
3. Save the LoRA model as `.keras` and load it back; export the adapter as PEFT files under the names
   Hugging Face's GPT-2 uses (`transformer.h.0.attn.c_attn`: query, key and value fused), which PEFT loads
   onto `transformers.GPT2LMHeadModel`.
4. Reload the PEFT files, merge them into the pretrained model (`tf_lora.adapters.apply(..., mode="merge")`,
   no mapping: the names are recognised) and check that it predicts what the LoRA model predicts; then
   `merge_and_unload` the LoRA model into plain Keras layers.

    .venv/bin/python examples/keras_hub_lora.py [--out DIR]     (with the wheel installed)
"""

import argparse
import os
import sys
import tempfile

import keras
import keras_hub
import numpy as np

import tf_lora

VOCAB, LENGTH = 48, 16


def sequences(step, count, seed):
    """Token sequences counting up by `step` (mod VOCAB) from random starts, as (inputs, next tokens)."""
    start = np.random.default_rng(seed).integers(0, VOCAB, (count, 1))
    tokens = (start + step * np.arange(LENGTH + 1)) % VOCAB
    ids = tokens[:, :-1].astype("int32")
    return {"token_ids": ids, "padding_mask": np.ones_like(ids)}, tokens[:, 1:].astype("int32")


def accuracy(model, x, y):
    return float(np.mean(np.argmax(model.predict(x, verbose=0), axis=-1) == y))


def pretrained():
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCAB,
        num_layers=2,
        num_heads=4,
        hidden_dim=64,
        intermediate_dim=128,
        max_sequence_length=LENGTH,
    )
    model = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = sequences(1, 512, seed=0)
    model.fit(x, y, epochs=8, batch_size=32, verbose=0)
    return model


def trainable(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", help="where the .keras file and the PEFT adapter go (default: a temporary directory)"
    )
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="tf_lora_keras_hub_")
    base = pretrained()
    x_old, y_old = sequences(1, 128, seed=1)
    x_new, y_new = sequences(3, 128, seed=2)
    print(f"pretrained GPT-2 ({trainable(base)} parameters) on counting by 1")
    print(
        f"  next-token accuracy, counting by 1: {accuracy(base, x_old, y_old):.3f}   "
        f"by 3: {accuracy(base, x_new, y_new):.3f}"
    )

    model, adapted = tf_lora.inject_lora(base, rank=8, alpha=16)  # a copy: `base` stays as it was
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = sequences(3, 512, seed=3)
    model.fit(x, y, epochs=8, batch_size=32, verbose=0)
    share = trainable(model) / sum(int(np.prod(w.shape)) for w in model.weights)
    print(f"LoRA fine-tuned on counting by 3: {len(adapted)} layers adapted, e.g. {adapted[0]}")
    print(f"  {trainable(model)} trainable parameters ({100 * share:.1f}% of the model)")
    new_accuracy = accuracy(model, x_new, y_new)
    print(f"  next-token accuracy, counting by 3: {new_accuracy:.3f}")

    path = os.path.join(out, "gpt2-lora.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    same_file = np.abs(reloaded.predict(x_new, verbose=0) - model.predict(x_new, verbose=0)).max()
    print(f"saved and loaded {path}: max |logits difference| = {same_file:.2e}")

    adapters = tf_lora.adapters.from_model(model)
    peft_dir = os.path.join(out, "gpt2-peft")
    tf_lora.adapters.save_peft(adapters, peft_dir, base_model_name_or_path="gpt2", overwrite=True)
    print(
        f"exported the adapter as PEFT files ({len(adapters)} modules, e.g. {sorted(adapters)[0]}): "
        f"{peft_dir}"
    )

    merged = base  # the pretrained model, untouched by inject_lora (it adapted a copy)
    report = tf_lora.adapters.apply(merged, tf_lora.adapters.load_peft(peft_dir), mode="merge")
    lora_logits, merged_logits = model.predict(x_new, verbose=0), merged.predict(x_new, verbose=0)
    gap = float(np.abs(lora_logits - merged_logits).max())
    agree = float(np.mean(np.argmax(lora_logits, -1) == np.argmax(merged_logits, -1)))
    print(
        f"reloaded the PEFT files and merged them into the pretrained model ({len(report.applied)} layers):"
    )
    print(f"  max |logits difference| = {gap:.2e}, same next token at {100 * agree:.1f}% of positions")
    tf_lora.merge_and_unload(model)
    plain = not tf_lora.layers.lora_layers(model)
    unloaded = float(np.abs(model.predict(x_new, verbose=0) - lora_logits).max())
    print(f"merge_and_unload: plain Keras layers again: {plain}, max |logits difference| = {unloaded:.2e}")
    ok = new_accuracy > 0.9 and same_file < 1e-5 and gap < 1e-3 and agree > 0.99 and plain and unloaded < 1e-3
    print(
        "PASS" if ok else "FAIL",
        ": LoRA learned the new task on a keras-hub GPT-2, and its PEFT export merged back",
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
