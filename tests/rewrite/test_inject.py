"""tf_lora.rewrite.inject and `tf-lora inject`: new adapters on an existing model's MatMuls."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_lora
from tf_lora.rewrite import RewriteError, cli


class Plain(tf.Module):
    """A model trained without tf_lora: relu(x @ dense/kernel) @ head/kernel (head transposed)."""

    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(0)
        self.w1 = tf.Variable(rng.standard_normal((6, 5)).astype(np.float32), name="dense/kernel")
        self.w2 = tf.Variable(rng.standard_normal((4, 5)).astype(np.float32), name="head/kernel")  # [out, in]

    @tf.function(input_signature=[tf.TensorSpec([None, 6], tf.float32)])
    def __call__(self, x):
        return {"y": tf.matmul(tf.nn.relu(tf.matmul(x, self.w1)), self.w2, transpose_b=True)}


def _plain(tmp_path):
    module = Plain()
    tf.saved_model.save(module, str(tmp_path / "model"), signatures=module.__call__)
    return module, tmp_path / "model"


def test_inject_keeps_outputs_trains_and_folds_back(tmp_path):
    module, src = _plain(tmp_path)
    report = tf_lora.rewrite.inject(src, tmp_path / "injected", target="dense|head", rank=3, alpha=6.0)
    assert [(i.weight, i.shape) for i in report] == [("dense/kernel", (6, 5)), ("head/kernel", (5, 4))]
    assert tf_lora.rewrite.verify(src, tmp_path / "injected") == {"serving_default": 0.0}  # B starts at zero
    adapters = tf_lora.rewrite.inspect(tmp_path / "injected")["adapters"]
    assert sorted((a["weight"], a["rank"], a["scale"]) for a in adapters) == [
        ("dense/kernel", 3, 2.0),
        ("head/kernel", 3, 2.0),
    ]

    loaded = tf.saved_model.load(str(tmp_path / "injected"))
    a = loaded.tf_lora_dense_kernel_lora_a
    b = loaded.tf_lora_dense_kernel_lora_b
    assert a.trainable and b.trainable and a.shape == (6, 3) and b.shape == (3, 5)
    limit = np.sqrt(6 / 6)
    assert np.all(np.abs(a.numpy()) <= limit) and np.abs(a.numpy()).max() > limit / 2  # He-uniform
    np.testing.assert_array_equal(b.numpy(), 0)

    # The adapter trains: a few SGD steps on the loaded model lower a loss, base weights frozen by choice.
    serve = loaded.signatures["serving_default"]
    x = tf.constant(np.random.default_rng(1).standard_normal((32, 6)).astype(np.float32))
    target = tf.zeros([32, 4])
    variables = [b, loaded.tf_lora_head_kernel_lora_b]
    losses = []
    for _ in range(20):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((serve(x=x)["y"] - target) ** 2)
        for v, g in zip(variables, tape.gradient(loss, variables), strict=True):
            v.assign_sub(0.01 * g)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    # What it computes is x W + s x A B (checked on the first layer with numpy).
    h = np.maximum(x.numpy() @ (module.w1.numpy() + 2.0 * a.numpy() @ b.numpy()), 0)
    head = module.w2.numpy().T + 2.0 * loaded.tf_lora_head_kernel_lora_a.numpy() @ variables[1].numpy()
    np.testing.assert_allclose(serve(x=x)["y"], h @ head, rtol=1e-4, atol=1e-4)

    tf_lora.rewrite.fold(tmp_path / "injected", tmp_path / "folded")  # untrained adapters: the original back
    assert tf_lora.rewrite.verify(src, tmp_path / "folded") == {"serving_default": 0.0}


def test_inject_keras_export_through_the_cli(tmp_path, capsys):
    keras.utils.set_random_seed(0)
    inp = keras.Input((6,))
    model = keras.Model(inp, keras.layers.Dense(3, name="head")(keras.layers.Dense(5, name="hidden")(inp)))
    model.export(tmp_path / "model", verbose=False)
    args = ["inject", str(tmp_path / "model"), str(tmp_path / "out"), "--target", "hidden", "--rank", "2"]
    assert cli.main([*args, "--alpha", "4", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "hidden/kernel [6, 5]: new adapter hidden/kernel/lora_a, hidden/kernel/lora_b" in out
    assert "verify serve: max |difference| = 0" in out
    loaded = tf.saved_model.load(str(tmp_path / "out"))
    names = [v.name for v in loaded.trainable_variables]
    assert "hidden/kernel/lora_a:0" in names and "hidden/kernel/lora_b:0" in names

    assert cli.main([*args[:5], "--target", "nothing", "--rank", "2", "--alpha", "4", "--overwrite"]) == 2
    assert (
        "no MatMul weight matches 'nothing', nor any Einsum kernel (weights that can take an adapter: "
        "['head/kernel', 'hidden/kernel'])" in capsys.readouterr().err
    )


def test_inject_bad_arguments(tmp_path):
    _, src = _plain(tmp_path)
    with pytest.raises(RewriteError, match="rank must be >= 1, got 0"):
        tf_lora.rewrite.inject(src, tmp_path / "out", target="dense", rank=0, alpha=1.0)
    assert not os.path.exists(tmp_path / "out")
