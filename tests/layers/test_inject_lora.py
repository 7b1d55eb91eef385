"""tf_lora.inject_lora on Sequential and functional models."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import tf_lora


def _sequential():
    keras.utils.set_random_seed(3)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu", name="hidden"),
            keras.layers.Dropout(0.1, name="drop"),
            keras.layers.Dense(3, name="head"),
        ]
    )


def _functional():
    keras.utils.set_random_seed(4)
    inp = keras.Input((6,))
    a = keras.layers.Dense(8, activation="tanh", name="a")(inp)
    b = keras.layers.Dense(8, activation="relu", name="b")(inp)
    out = keras.layers.Dense(2, name="out")(keras.layers.Concatenate(name="cat")([a, b]))
    return keras.Model(inp, out)


@pytest.mark.parametrize(
    "make,target,expected",
    [(_sequential, "hidden|head", ["head", "hidden"]), (_functional, ["a", "out"], ["a", "out"])],
    ids=["sequential", "functional"],
)
def test_inject_keeps_outputs_and_trains_only_adapters(make, target, expected):
    model = make()
    x = np.random.default_rng(0).standard_normal((64, 6)).astype(np.float32)
    y = np.random.default_rng(1).standard_normal((64, model.output_shape[-1])).astype(np.float32)
    before = model.predict(x, verbose=0)
    lora_model, adapted = tf_lora.inject_lora(model, rank=2, alpha=4, target=target)
    assert adapted == expected
    np.testing.assert_allclose(lora_model.predict(x, verbose=0), before, rtol=1e-6, atol=1e-6)
    assert all(isinstance(lora_model.get_layer(n), tf_lora.layers.LoraDense) for n in adapted)
    assert {w.path.split("/")[-1] for w in lora_model.trainable_weights} == {"lora_a", "lora_b"}
    frozen = [w.numpy() for w in lora_model.non_trainable_weights]
    lora_model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    lora_model.fit(x, y, epochs=5, verbose=0)
    for w, value in zip(lora_model.non_trainable_weights, frozen, strict=True):
        np.testing.assert_array_equal(w.numpy(), value)
    assert not np.allclose(lora_model.predict(x, verbose=0), before)
    np.testing.assert_array_equal(model.predict(x, verbose=0), before)  # the original is untouched


def test_inject_bad_targets():
    model = _sequential()
    with pytest.raises(
        ValueError,
        match=r"no Dense, EinsumDense or Embedding layer matches 'nothing' \(they are, by path: "
        r"\[head, hidden\]\)",
    ):
        tf_lora.inject_lora(model, target="nothing")
    with pytest.raises(
        ValueError,
        match=r"\['drop'\] are not Dense, EinsumDense or Embedding layers of the model "
        r"\(\['drop'\] are other layers\)",
    ):
        tf_lora.inject_lora(model, target=["hidden", "drop"])
    # Was a raw re.error.
    with pytest.raises(ValueError, match=r"target '\(' is not a valid regular expression"):
        tf_lora.inject_lora(model, target="(")


class Subclassed(keras.Model):
    """A subclassed model without get_config, its Dense layers two levels down."""

    def __init__(self):
        super().__init__()
        self.block = keras.Sequential(
            [keras.layers.Dense(8, activation="relu", name="up"), keras.layers.Dense(4, name="down")],
            name="block",
        )
        self.head = keras.layers.Dense(2, name="head")

    def call(self, x):
        return self.head(self.block(x))


def test_subclassed_model_at_any_depth_in_place():
    model = Subclassed()
    x = np.random.default_rng(0).standard_normal((5, 6)).astype(np.float32)
    before = model(x).numpy()
    with pytest.raises(ValueError, match="cannot copy Subclassed .*pass copy=False"):
        tf_lora.inject_lora(model, rank=2)
    same, adapted = tf_lora.inject_lora(model, rank=2, alpha=4, copy=False)
    assert same is model and adapted == ["block/down", "block/up", "head"]
    np.testing.assert_array_equal(model(x).numpy(), before)
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    model.fit(x, np.ones((5, 2), np.float32), epochs=3, verbose=0)
    assert {w.path.rsplit("/", 1)[-1] for w in model.trainable_weights} == {"lora_a", "lora_b"}
    assert np.abs(model(x).numpy() - before).max() > 1e-3


def test_dense_subclass_keeping_its_call_gets_a_lora_subclass():
    @keras.saving.register_keras_serializable(package="tests")
    class ScaledInit(keras.layers.Dense):
        pass

    inp = keras.Input((6,))
    model = keras.Model(inp, ScaledInit(3, name="proj")(inp))
    _, adapted = tf_lora.inject_lora(model, rank=2, copy=False)
    layer = model.get_layer("proj")
    assert (
        adapted == ["proj"] and isinstance(layer, ScaledInit) and isinstance(layer, tf_lora.layers.LoraDense)
    )
    assert type(layer).__name__ == "LoraScaledInit"


def test_a_seeded_inject_makes_the_same_adapters_in_every_process():
    # The layers were converted in the order of a set of paths, which follows string hashing: under
    # keras.utils.set_random_seed each process drew the same A values for other layers.
    script = """
import keras, numpy as np, tf_lora
keras.utils.set_random_seed(0)
inputs = keras.Input((4,))
x = inputs
for name in ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]:
    x = keras.layers.Dense(4, name=name)(x)
model, adapted = tf_lora.inject_lora(keras.Model(inputs, x), rank=2, copy=False)
layers = tf_lora.layers.lora_layers(model)
print(" ".join(f"{layers[p].adapter_slot().a.numpy().sum():.6f}" for p in adapted))
"""
    outputs = set()
    for hash_seed in ("1", "2", "3"):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONHASHSEED=hash_seed)
        proc = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        outputs.add(proc.stdout.strip())
    assert len(outputs) == 1, outputs
