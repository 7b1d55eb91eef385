"""Main example: LoRA fine-tuning of a Keras classifier on handwritten digits, end to end.

1. Pretrain a small classifier (64 -> 128 -> 64 -> 10) on digits 0-4 of scikit-learn's digits dataset
   (it ships inside scikit-learn: nothing is downloaded).
2. Inject LoRA into its Dense layers with `tf_lora.inject_lora` (base frozen) and fine-tune on digits 5-9
   (with a replay of 30 examples of each old digit).
3. Report accuracy before and after, and how many parameters were trained.
4. Export the adapter as PEFT files (`adapter_config.json` + `adapter_model.safetensors`), reload them, merge
   them into a fresh copy of the pretrained model, and check that it predicts what the LoRA model predicts.

    make demo            (or: .venv/bin/python examples/digits_lora.py [--out DIR], with the wheel installed)
"""

import argparse
import os
import sys
import tempfile

import keras
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import tf_lora

OLD, NEW = range(0, 5), range(5, 10)
RANK = 8


def data():
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    return train_test_split(x, digits.target, test_size=0.3, stratify=digits.target, random_state=0)


def accuracy(model, x, y, classes):
    keep = np.isin(y, list(classes))
    return float(np.mean(np.argmax(model.predict(x[keep], verbose=0), axis=1) == y[keep]))


def pretrained(x, y):
    keras.utils.set_random_seed(0)
    inp = keras.Input((64,))
    h = keras.layers.Dense(128, activation="relu", name="fc1")(inp)
    h = keras.layers.Dense(64, activation="relu", name="fc2")(h)
    model = keras.Model(inp, keras.layers.Dense(10, activation="softmax", name="head")(h))
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    keep = np.isin(y, list(OLD))
    model.fit(x[keep], y[keep], epochs=30, batch_size=64, verbose=0)
    return model


def trainable_count(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="where the PEFT adapter goes (default: a temporary directory)")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="tf_lora_digits_")

    x_train, x_test, y_train, y_test = data()
    base = pretrained(x_train, y_train)
    full = trainable_count(base)
    print(f"pretrained on digits 0-4: {full} trainable parameters")
    print(
        f"  accuracy on 0-4: {accuracy(base, x_test, y_test, OLD):.3f}   on 5-9: "
        f"{accuracy(base, x_test, y_test, NEW):.3f}"
    )

    model, adapted = tf_lora.inject_lora(base, rank=RANK, alpha=2 * RANK, target=["fc1", "fc2", "head"])
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    lora = trainable_count(model)
    # Digits 5-9, plus a replay of 30 examples per old digit so that 0-4 are not forgotten.
    rng = np.random.default_rng(0)
    replay = np.concatenate([rng.choice(np.flatnonzero(y_train == c), 30, replace=False) for c in OLD])
    keep = np.concatenate([np.flatnonzero(np.isin(y_train, list(NEW))), replay])
    model.fit(x_train[keep], y_train[keep], epochs=40, batch_size=64, verbose=0)
    after_new, after_all = accuracy(model, x_test, y_test, NEW), accuracy(model, x_test, y_test, range(10))
    print(
        f"LoRA fine-tuned on digits 5-9 (rank {RANK}, layers {adapted}): {lora} trainable parameters, "
        f"{lora / full:.1%} of the model's"
    )
    print(
        f"  accuracy on 5-9: {after_new:.3f}   on 0-4: {accuracy(model, x_test, y_test, OLD):.3f}   "
        f"on all ten: {after_all:.3f}"
    )

    peft_dir = os.path.join(out, "digits-peft")
    tf_lora.adapters.save_peft(tf_lora.adapters.from_model(model), peft_dir, overwrite=True)
    print(f"exported the adapter as PEFT files: {peft_dir}: {sorted(os.listdir(peft_dir))}")

    reloaded = tf_lora.adapters.load_peft(peft_dir)
    merged = keras.models.clone_model(base)
    merged.set_weights(base.get_weights())
    tf_lora.adapters.apply(merged, reloaded, mode="merge")  # plain Dense layers: stock Keras from here on
    p_lora, p_merged = model.predict(x_test, verbose=0), merged.predict(x_test, verbose=0)
    diff = float(np.max(np.abs(p_lora - p_merged)))
    agree = float(np.mean(np.argmax(p_lora, 1) == np.argmax(p_merged, 1)))
    print("reloaded the PEFT files and merged them into a copy of the pretrained model:")
    print(
        f"  max |p_lora - p_merged| = {diff:.2e}, same predicted class on {agree:.1%} of {len(x_test)} digits"
    )

    if after_new < 0.9 or after_all < 0.85 or diff > 1e-4 or agree < 1.0:
        print("FAIL: the fine-tuned or the merged model is not what it should be")
        return 1
    print("PASS: LoRA learned the new digits, and the exported adapter merged gives the same predictions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
