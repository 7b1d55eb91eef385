"""The rewrite tools on BatchMatMul projections: with a fixed sequence length, and always for a 2-D kernel,
TensorFlow runs Keras's EinsumDense as reshapes (and transposes) of the kernel and a BatchMatMulV2 (Gemma's
feed-forward, every attention projection of a fixed-length export). inspect lists them, fold folds their
applies into the kernel in its own layout, inject adapts them and swap-adapter fills those adapters; the
references are the Keras layers themselves (their merge, and file adapters attached in Keras)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_lora
from tf_lora.rewrite.model_files import ModelFiles

RNG = np.random.default_rng(3)
T = 5  # the fixed sequence length of the exports
# name -> (equation, output shape, bias axes, [in, out] of the kernel as the BatchMatMul uses it). "gemma" and
# "ffw_t" reach the BatchMatMul through a Transpose of the kernel, "query" and "output" through a Reshape.
LAYERS = {
    "query": ("btd,dnh->btnh", (T, 2, 3), "nh", [8, 6]),
    "output": ("btnh,nhd->btd", (T, 8), "d", [6, 8]),
    "gemma": ("btd,ndh->btnh", (T, 2, 3), None, [8, 6]),
    "ffw": ("btd,df->btf", (T, 6), "f", [8, 6]),
    "ffw_t": ("btd,fd->btf", (T, 6), None, [8, 6]),
}


def _model(make_layer):
    """x [None, T, 8] -> query -> output, gemma, ffw and ffw_t, concatenated on the last axis."""
    inp = keras.Input((T, 8))
    layers = {name: make_layer(name, *spec[:3]) for name, spec in LAYERS.items()}
    heads = [layers["output"](layers["query"](inp)), layers["ffw"](inp), layers["ffw_t"](inp)]
    heads.append(keras.layers.Reshape((T, 6))(layers["gemma"](inp)))
    return keras.Model(inp, keras.layers.Concatenate()(heads)), layers


def _export(model, path):
    model.export(path, verbose=False, input_signature=[tf.TensorSpec([None, T, 8], tf.float32)])
    ops = {n.op for f in ModelFiles(path).meta.graph_def.library.function for n in f.node_def}
    assert "BatchMatMulV2" in ops and "Einsum" not in ops  # what this file is about
    return path


def _lora_model(policy=None):
    keras.utils.set_random_seed(4)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy or "float32")
    try:
        model, layers = _model(
            lambda name, eq, shape, bias: tf_lora.layers.LoraEinsumDense(
                eq, shape, bias_axes=bias, rank=2, alpha=4, name=name
            )
        )
    finally:
        keras.config.set_dtype_policy(previous)
    for layer in layers.values():
        slot = layer.adapter_slot()
        slot.b.assign(RNG.standard_normal(slot.b.shape).astype(np.float32) * 0.5)
        if layer.bias is not None:
            layer.bias.assign(RNG.standard_normal(layer.bias.shape).astype(np.float32))
    return model, layers


def _serve(path, x):
    loaded = tf.saved_model.load(str(path))
    return loaded.serve(x).numpy(), {v.name.removesuffix(":0"): v.numpy() for v in loaded.variables}


@pytest.mark.parametrize("policy", [None, "mixed_bfloat16"])
def test_fold_batch_matmul_applies_into_the_kernel_layout(tmp_path, policy):
    model, layers = _lora_model(policy)
    src = _export(model, tmp_path / "lora")
    x = RNG.standard_normal((3, T, 8)).astype(np.float32)
    expected = np.asarray(model(x), np.float32)

    info = tf_lora.rewrite.inspect(src)
    assert sorted(
        (a["weight"], a["weight_shape"], a["op"], a["rank"], a["scale"]) for a in info["adapters"]
    ) == [
        (f"{name}/kernel", list(layers[name].kernel.shape), "BatchMatMulV2", 2, 2.0)
        for name in sorted(LAYERS)
    ]

    out = tmp_path / "folded"
    report = tf_lora.rewrite.fold(src, out)
    assert sorted(f.weight for f in report.folds if f.folded) == sorted(f"{n}/kernel" for n in LAYERS)
    assert not [op for op in ModelFiles(out).meta.meta_info_def.stripped_op_list.op if "TfLora" in op.name]
    served, variables = _serve(out, x)
    tolerance = 2e-2 if policy else 2e-5
    np.testing.assert_allclose(served, expected, atol=tolerance * np.abs(expected).max())

    if policy is None:  # the reference: Keras's layers merge their adapters into their kernels
        tf_lora.layers.merge(model)
        for name, layer in layers.items():
            np.testing.assert_allclose(
                variables[f"{name}/kernel"], layer.kernel.numpy(), rtol=1e-5, atol=1e-6
            )
        return
    # Under mixed precision the graph multiplies by A, B and the scale in the compute dtype, and fold folds
    # what the graph computes: the same update from the rounded values, in the kernel's own layout.
    for name, layer in layers.items():
        slot = layer.adapter_slot()
        a, b, scale = (tf.cast(tf.cast(v, tf.bfloat16), tf.float64).numpy() for v in (slot.a, slot.b, 2.0))
        update = scale * a @ b  # [in, out]
        if name == "gemma":  # kernel [n, d, h]: its [in, out] view is [d, (n, h)]
            update = update.reshape(8, 2, 3).transpose(1, 0, 2)
        elif name == "ffw_t":  # kernel [f, d]
            update = update.T
        update = update.reshape(layer.kernel.shape)
        expected_kernel = layer.kernel.numpy().astype(np.float64) + update
        np.testing.assert_allclose(variables[f"{name}/kernel"], expected_kernel, rtol=1e-6, atol=1e-6)


def test_inject_and_swap_adapter_on_batch_matmul_projections(tmp_path):
    keras.utils.set_random_seed(5)
    model, _ = _model(
        lambda name, eq, shape, bias: keras.layers.EinsumDense(eq, shape, bias_axes=bias, name=name)
    )
    src = _export(model, tmp_path / "plain")
    x = RNG.standard_normal((3, T, 8)).astype(np.float32)

    candidates = tf_lora.rewrite.inspect(src)["matmul_candidates"]
    assert sorted((c["weight"], c["op"], c["matrix"]) for c in candidates) == [
        (f"{name}/kernel", "BatchMatMulV2", LAYERS[name][3]) for name in sorted(LAYERS)
    ]

    injected = tmp_path / "injected"
    report = tf_lora.rewrite.inject(src, injected, target=".*/kernel", rank=3, alpha=6.0)
    assert sorted((i.weight, list(i.shape)) for i in report) == [
        (f"{name}/kernel", LAYERS[name][3]) for name in sorted(LAYERS)
    ]
    original, _ = _serve(src, x)
    np.testing.assert_array_equal(_serve(injected, x)[0], original)  # B starts at zero
    info = tf_lora.rewrite.inspect(injected)
    assert sorted((a["weight"], a["op"], a["rank"]) for a in info["adapters"]) == [
        (f"{name}/kernel", "BatchMatMulV2", 3) for name in sorted(LAYERS)
    ]
    assert info["matmul_candidates"] == []

    # Adapters from a file go into the injected model's variables; the Keras model with the same adapters
    # attached is the reference.
    adapters = {
        name: tf_lora.adapters.Adapter(
            RNG.standard_normal((i, 3)).astype(np.float32) * 0.3,
            RNG.standard_normal((3, o)).astype(np.float32) * 0.3,
            alpha=6.0,
            module=name,
        )
        for name, (*_, (i, o)) in LAYERS.items()
    }
    swapped = tmp_path / "swapped"
    result = tf_lora.rewrite.swap_adapter(injected, swapped, adapters)
    assert sorted(result.swapped) == sorted(LAYERS)
    tf_lora.adapters.apply(model, tf_lora.adapters.AdapterSet(adapters), mode="attach")
    expected = np.asarray(model(x))
    assert np.abs(expected - original).max() > 0.1  # the adapters change the outputs
    np.testing.assert_allclose(_serve(swapped, x)[0], expected, atol=2e-5 * np.abs(expected).max())


def test_inject_adapts_a_kernel_seen_by_an_einsum_and_a_batch_matmul_alike(tmp_path):
    """One export with an open-length signature (Einsum) and a fixed-length one (BatchMatMulV2): the same
    kernel, seen as the same [in, out] by both, takes one adapter (inject said they could not share it)."""
    keras.utils.set_random_seed(6)
    inp = keras.Input((None, 8))
    model = keras.Model(inp, keras.layers.EinsumDense("btd,dnh->btnh", (None, 2, 3), name="query")(inp))
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", model.call, input_signature=[tf.TensorSpec([None, None, 8], tf.float32)])
    archive.add_endpoint("fixed", model.call, input_signature=[tf.TensorSpec([None, T, 8], tf.float32)])
    archive.write_out(str(tmp_path / "both"), verbose=False)
    ops = {n.op for f in ModelFiles(tmp_path / "both").meta.graph_def.library.function for n in f.node_def}
    assert {"Einsum", "BatchMatMulV2"} <= ops
    [injected] = tf_lora.rewrite.inject(
        tmp_path / "both", tmp_path / "out", target="query/kernel", rank=2, alpha=2.0
    )
    assert injected.shape == (8, 6) and len(injected.matmuls) >= 2
    x = RNG.standard_normal((2, T, 8)).astype(np.float32)
    loaded = tf.saved_model.load(str(tmp_path / "out"))
    np.testing.assert_allclose(loaded.serve(x).numpy(), np.asarray(model(x)), atol=1e-5)
    np.testing.assert_allclose(loaded.fixed(x).numpy(), np.asarray(model(x)), atol=1e-5)
