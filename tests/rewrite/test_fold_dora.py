"""fold on DoRA: tf_lora's LoRA layers with `use_dora` (a Dense and a Gemma-layout EinsumDense, whose DoRA
scale `magnitude / ||w + s a b||` multiplies the adapted rows) fold into weights that stock TensorFlow serves:
PEFT's DoRA merge, `w' = magnitude / ||w + s a b|| * (w + s a b)` per output column."""

import keras
import numpy as np
import tensorflow as tf

import tf_lora

RNG = np.random.default_rng(0)


def _dora_model(tmp_path):
    keras.utils.set_random_seed(0)
    inp = keras.Input((None, 8))
    query = tf_lora.layers.LoraEinsumDense(
        "btd,ndh->btnh", (None, 2, 3), rank=2, alpha=4, use_dora=True, name="q"
    )
    dense = tf_lora.layers.LoraDense(5, rank=3, alpha=3, use_dora=True, name="d")
    out = dense(keras.layers.Reshape((-1, 6))(query(inp)))
    model = keras.Model(inp, out)
    for layer in (query, dense):
        slot = layer.adapter_slot()
        slot.b.assign(RNG.standard_normal(slot.b.shape).astype(np.float32))
        slot.magnitude.assign(RNG.uniform(0.5, 2.0, slot.magnitude.shape).astype(np.float32))
    dense.bias.assign(RNG.standard_normal(5).astype(np.float32))
    model.export(tmp_path / "dora", verbose=False)
    return model, query, dense


def _peft_merge(w, a, b, scale, magnitude):
    """PEFT's DoRA merge on a weight [in, out]."""
    adapted = w + scale * a @ b
    return adapted * (magnitude / np.linalg.norm(adapted, axis=0))


def test_fold_dora_layers_gives_peft_merged_weights_on_stock_tensorflow(tmp_path, run_python):
    model, query, dense = _dora_model(tmp_path)
    x = RNG.standard_normal((2, 4, 8)).astype(np.float32)
    expected = model.predict(x, verbose=0)
    report = tf_lora.rewrite.fold(tmp_path / "dora", tmp_path / "folded")
    assert sorted(f.weight for f in report.folds) == ["d/kernel", "q/kernel"]
    folded = tf.saved_model.load(str(tmp_path / "folded"))
    np.testing.assert_allclose(folded.serve(x).numpy(), expected, rtol=1e-5, atol=1e-5)
    kernels = {v.name: v.numpy() for v in folded.variables}
    slot = dense.adapter_slot()
    np.testing.assert_allclose(
        kernels["d/kernel:0"],
        _peft_merge(dense.kernel.numpy(), slot.a.numpy(), slot.b.numpy(), slot.scale, slot.magnitude.numpy()),
        rtol=1e-5,
        atol=1e-6,
    )
    slot = query.adapter_slot()
    w = query.kernel.numpy().transpose(1, 0, 2).reshape(8, 6)  # [heads, in, head_dim] seen as [in, out]
    merged = _peft_merge(w, slot.a.numpy(), slot.b.numpy(), slot.scale, slot.magnitude.numpy())
    np.testing.assert_allclose(
        kernels["q/kernel:0"], merged.reshape(8, 2, 3).transpose(1, 0, 2), rtol=1e-5, atol=1e-6
    )
    np.save(tmp_path / "x.npy", x)
    printed = run_python(
        f"""
import sys
import numpy as np
import tensorflow as tf
loaded = tf.saved_model.load({str(tmp_path / "folded")!r})
np.save({str(tmp_path / "y.npy")!r}, loaded.serve(np.load({str(tmp_path / "x.npy")!r})).numpy())
print("tf_lora" in sys.modules)
"""
    )
    assert printed.strip() == "False"
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=1e-5, atol=1e-5)
