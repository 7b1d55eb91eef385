"""The rewrite tools on Einsum projections (keras.layers.EinsumDense, MultiHeadAttention's projections,
tf_lora.layers.LoraEinsumDense): inspect lists them, inject adapts their kernels seen as [in, out], fold folds
their applies into the kernel, swap-adapter fills their applies."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_lora
from tf_lora.rewrite import RewriteError, cli
from tf_lora.rewrite.model_files import ModelFiles

RNG = np.random.default_rng(0)
X = RNG.standard_normal((2, 5, 8)).astype(np.float32)

# (equation, output shape, bias axes, input shape): MultiHeadAttention's query and output projections, and
# Gemma's query projection (kernel [heads, hidden, head_dim]: the [in, out] view needs a transpose). Inputs
# have a sequence length of None, as in every model here: with it Keras keeps the Einsum op in the graph (a
# known length turns it into reshapes and a MatMul), as keras-hub's transformers exported for any length do.
PROJECTIONS = {
    "query": ("abc,cde->abde", (None, 2, 3), "de", (None, 8)),
    "output": ("abcd,cde->abe", (None, 8), "e", (None, 2, 3)),
    "gemma": ("btd,ndh->btnh", (None, 2, 3), None, (None, 8)),
}


def _mha(tmp_path):
    """MultiHeadAttention(2 heads of 3) self-attention on [batch, None, 8], exported."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((None, 8))
    mha = keras.layers.MultiHeadAttention(2, 3, name="mha")
    model = keras.Model(inp, mha(inp, inp))
    model.export(tmp_path / "mha", verbose=False)
    return model, mha, tmp_path / "mha"


def _lora_einsum(tmp_path, kind, name="proj"):
    """A LoraEinsumDense (rank 2, alpha 4: scale 2) with a random B, exported. (model, layer, dir, x)."""
    equation, output_shape, bias_axes, input_shape = PROJECTIONS[kind]
    keras.utils.set_random_seed(1)
    inp = keras.Input(input_shape)
    layer = tf_lora.layers.LoraEinsumDense(
        equation, output_shape, bias_axes=bias_axes, rank=2, alpha=4, name=name
    )
    model = keras.Model(inp, layer(inp))
    slot = layer.adapter_slot()
    slot.b.assign(RNG.standard_normal(slot.b.shape).astype(np.float32))
    if bias_axes:
        layer.bias.assign(RNG.standard_normal(layer.bias.shape).astype(np.float32))
    x = RNG.standard_normal((2, 5, *input_shape[1:])).astype(np.float32)
    model.export(tmp_path / kind, verbose=False)
    return model, layer, tmp_path / kind, x


def _serve(path, x):
    loaded = tf.saved_model.load(str(path))  # held: its functions need its variables alive
    return loaded.serve(x).numpy()


def _plugin_ops(path):
    return [op.name for op in ModelFiles(path).meta.meta_info_def.stripped_op_list.op if "TfLora" in op.name]


def test_inspect_lists_einsum_projections_and_their_adapters(tmp_path, capsys):
    _, _, src = _mha(tmp_path)
    info = tf_lora.rewrite.inspect(src)
    assert info["matmul_candidates"] == [] and info["adapters"] == []
    assert sorted(
        (e["weight"], e["equation"], e["shape"], e["matrix"]) for e in info["einsum_candidates"]
    ) == [
        ("mha/attention_output/kernel", "abcd,cde->abe", [2, 3, 8], [6, 8]),
        ("mha/key/kernel", "abc,cde->abde", [8, 2, 3], [8, 6]),
        ("mha/query/kernel", "abc,cde->abde", [8, 2, 3], [8, 6]),
        ("mha/value/kernel", "abc,cde->abde", [8, 2, 3], [8, 6]),
    ]
    assert all(e["node"].endswith("/einsum/Einsum") for e in info["einsum_candidates"])
    assert cli.main(["inspect", str(src)]) == 0
    out = capsys.readouterr().out
    assert "Einsum candidates for an adapter: 4" in out
    assert "mha/attention_output/kernel [2, 3, 8] in 'abcd,cde->abe', as [in, out] [6, 8]" in out

    # A LoraEinsumDense's apply is an adapter on its kernel; the adapted Einsum is no candidate any more.
    _, _, src, _ = _lora_einsum(tmp_path, "gemma")
    info = tf_lora.rewrite.inspect(src)
    assert [
        (a["weight"], a["weight_shape"], a["adapter"], a["rank"], a["scale"], a["equation"])
        for a in info["adapters"]
    ] == [("proj/kernel", [2, 8, 3], "proj/lora_a", 2, 2.0, "abc,dce->abde")]  # Keras's letters
    assert info["einsum_candidates"] == []
    assert cli.main(["inspect", str(src)]) == 0
    assert "proj/lora_a on proj/kernel [2, 8, 3] in 'abc,dce->abde': rank 2, scale 2" in (
        capsys.readouterr().out
    )

    # An Einsum whose output keeps the kernel axes in another order takes no adapter: inspect says why.
    keras.utils.set_random_seed(0)
    inp = keras.Input((None, 8))
    model = keras.Model(inp, keras.layers.EinsumDense("abc,cde->abed", (None, 3, 2), name="odd")(inp))
    model.export(tmp_path / "odd", verbose=False)
    [entry] = tf_lora.rewrite.inspect(tmp_path / "odd")["einsum_candidates"]
    assert (entry["weight"], entry["shape"], "matrix" in entry) == ("odd/kernel", [8, 2, 3], False)
    assert "would need a transpose" in entry["not_injectable"]


def test_inject_einsum_projections_keeps_outputs_trains_and_folds(tmp_path):
    model, mha, src = _mha(tmp_path)
    out = tmp_path / "injected"
    report = tf_lora.rewrite.inject(src, out, target="mha/(query|attention_output)", rank=2, alpha=4.0)
    assert sorted((i.weight, i.shape, len(i.matmuls)) for i in report) == [
        ("mha/attention_output/kernel", (6, 8), 1),
        ("mha/query/kernel", (8, 6), 1),
    ]
    original = _serve(src, X)
    loaded = tf.saved_model.load(str(out))
    np.testing.assert_array_equal(loaded.serve(X).numpy(), original)  # B starts at zero
    assert tf_lora.rewrite.verify(src, out) == {"serve": 0.0, "serving_default": 0.0}
    adapters = tf_lora.rewrite.inspect(out)["adapters"]
    assert sorted(
        (a["weight"], a["weight_shape"], a["rank"], a["scale"], a["equation"]) for a in adapters
    ) == [
        ("mha/attention_output/kernel", [2, 3, 8], 2, 2.0, "abcd,cde->abe"),
        ("mha/query/kernel", [8, 2, 3], 2, 2.0, "abc,cde->abde"),
    ]

    q_a, q_b = loaded.tf_lora_mha_query_kernel_lora_a, loaded.tf_lora_mha_query_kernel_lora_b
    o_a, o_b = (
        loaded.tf_lora_mha_attention_output_kernel_lora_a,
        loaded.tf_lora_mha_attention_output_kernel_lora_b,
    )
    assert [tuple(v.shape) for v in (q_a, q_b, o_a, o_b)] == [(8, 2), (2, 6), (6, 2), (2, 8)]
    assert all(v.trainable for v in (q_a, q_b, o_a, o_b))
    assert {"mha/query/kernel/lora_b:0", "mha/attention_output/kernel/lora_b:0"} <= {
        v.name for v in loaded.trainable_variables
    }
    limit = np.sqrt(6 / 8)  # He-uniform over in = 8
    assert np.all(np.abs(q_a.numpy()) <= limit) and np.abs(q_a.numpy()).max() > limit / 2
    np.testing.assert_array_equal(q_b.numpy(), 0)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(loaded.serve(X) ** 2)
    gradients = tape.gradient(loss, [q_b, o_b])
    assert all(g is not None and np.abs(g.numpy()).max() > 0 for g in gradients)

    # Trained adapters compute the Keras model whose kernels got scale * A @ B, seen as [in, out].
    q_b.assign(RNG.standard_normal((2, 6)).astype(np.float32))
    o_b.assign(RNG.standard_normal((2, 8)).astype(np.float32))
    query, output = mha._query_dense.kernel, mha._output_dense.kernel
    query.assign(query.numpy() + 2.0 * (q_a.numpy() @ q_b.numpy()).reshape(8, 2, 3))
    output.assign(output.numpy() + 2.0 * (o_a.numpy() @ o_b.numpy()).reshape(2, 3, 8))
    expected = model.predict(X, verbose=0)
    assert np.abs(expected - original).max() > 0.1
    np.testing.assert_allclose(loaded.serve(X), expected, rtol=1e-4, atol=1e-4)

    # Saved and folded: the kernels take the adapters, stock TensorFlow ops only.
    tf.saved_model.save(loaded, str(tmp_path / "trained"), signatures=dict(loaded.signatures))
    folded = tmp_path / "folded"
    report = tf_lora.rewrite.fold(tmp_path / "trained", folded)
    assert report.weights == {"mha/attention_output/kernel": 1, "mha/query/kernel": 1}
    assert _plugin_ops(folded) == []
    np.testing.assert_allclose(_serve(folded, X), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", sorted(PROJECTIONS))
def test_fold_lora_einsum_dense_into_its_kernel(tmp_path, kind, run_python):
    model, layer, src, x = _lora_einsum(tmp_path, kind)
    expected = model.predict(x, verbose=0)
    report = tf_lora.rewrite.fold(src, tmp_path / "folded")
    assert [(f.weight, f.adapter, f.rank, f.scale, f.folded) for f in report.folds] == [
        ("proj/kernel", "proj/lora_a", 2, 2.0, True)
    ]
    assert _plugin_ops(tmp_path / "folded") == [] and _plugin_ops(src) == ["TfLora>LoraApply"]

    folded = tf.saved_model.load(str(tmp_path / "folded"))
    np.testing.assert_allclose(folded.serve(x), expected, rtol=1e-5, atol=1e-5)
    # The folded kernel alone, in numpy, gives the adapted layer's output.
    kernel, *twins = [v.numpy() for v in folded.variables if v.name == "proj/kernel:0"]
    assert all(np.array_equal(twin, kernel) for twin in twins)
    bias = layer.bias.numpy() if layer.bias is not None else 0.0
    np.testing.assert_allclose(
        np.einsum(PROJECTIONS[kind][0], x, kernel) + bias, expected, rtol=1e-5, atol=1e-5
    )
    assert np.abs(kernel - layer.kernel.numpy()).max() > 0.1

    # A fresh process that never imports tf_lora runs it.
    np.save(tmp_path / "x.npy", x)
    printed = run_python(
        f"""
import sys
import numpy as np
import tensorflow as tf
loaded = tf.saved_model.load({str(tmp_path / "folded")!r})
y = loaded.serve(np.load({str(tmp_path / "x.npy")!r}))
np.save({str(tmp_path / "y.npy")!r}, y.numpy())
print("tf_lora" in sys.modules)
"""
    )
    assert printed.strip() == "False"
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=1e-5, atol=1e-5)


def test_fold_multi_adapter_lora_einsum_dense_folds_the_active_adapter(tmp_path):
    keras.utils.set_random_seed(2)
    inp = keras.Input((None, 8))
    layer = tf_lora.layers.LoraEinsumDense(
        "btd,ndh->btnh",
        (None, 2, 3),
        rank=2,
        alpha=4,
        name="q",
        adapters=[{"name": "sql", "rank": 3, "alpha": 3}],
    )
    model = keras.Model(inp, layer(inp))
    for slot in layer._slots.values():
        slot.b.assign(RNG.standard_normal(slot.b.shape).astype(np.float32))
    layer.set_active_adapter("sql")
    expected = model.predict(X, verbose=0)
    model.export(tmp_path / "model", verbose=False)
    adapters = tf_lora.rewrite.inspect(tmp_path / "model")["adapters"]
    assert [(a["weight"], a["adapter"], a["batch_index"], a["rank"], a["equation"]) for a in adapters] == [
        ("q/kernel", "q/lora_a", 0, 2, "abc,dce->abde"),
        ("q/kernel", "q/lora_a_sql", 1, 3, "abc,dce->abde"),
    ]
    report = tf_lora.rewrite.fold(tmp_path / "model", tmp_path / "folded")
    assert [(f.adapter, f.rank, f.scale, f.folded) for f in report.folds] == [("q/lora_a_sql", 3, 1.0, True)]
    assert _plugin_ops(tmp_path / "folded") == []
    np.testing.assert_allclose(_serve(tmp_path / "folded", X), expected, rtol=1e-5, atol=1e-5)


def test_inject_target_errors_name_the_weights_not_the_biases(tmp_path, capsys):
    _, _, src = _mha(tmp_path)
    kernels = "['mha/attention_output/kernel', 'mha/key/kernel', 'mha/query/kernel', 'mha/value/kernel']"
    with pytest.raises(RewriteError) as raised:
        tf_lora.rewrite.inject(src, tmp_path / "out", target="nothing", rank=2, alpha=2.0)
    assert str(raised.value) == (
        "inject: no MatMul weight matches 'nothing', nor any Einsum kernel (weights that can take an "
        f"adapter: {kernels})"
    )
    with pytest.raises(RewriteError) as raised:
        tf_lora.rewrite.inject(src, tmp_path / "out", target=".*query/bias", rank=2, alpha=2.0)
    assert str(raised.value).startswith(
        "inject: no MatMul weight matches '.*query/bias', nor any Einsum kernel: it matches only biases "
        "['mha/query/bias'] (an adapter goes on the weight a MatMul or Einsum multiplies by"
    )
    assert str(raised.value).endswith(f"; weights that can take an adapter: {kernels}")
    assert not os.path.exists(tmp_path / "out")

    # What users typed: the query layer's kernel is adapted, its bias left alone.
    report = tf_lora.rewrite.inject(src, tmp_path / "out", target=".*query.*", rank=2, alpha=2.0)
    assert [(i.weight, i.shape) for i in report] == [("mha/query/kernel", (8, 6))]

    # The command line: an error on stderr, exit 2; an adapted Einsum's kernel is refused like a MatMul's.
    args = ["inject", str(src), str(tmp_path / "cli"), "--rank", "2", "--alpha", "2"]
    assert cli.main([*args, "--target", "nothing"]) == 2
    err = capsys.readouterr().err
    assert (
        "no MatMul weight matches 'nothing', nor any Einsum kernel (weights that can take an adapter: " in err
    )
    assert f"adapter: {kernels})" in err
    _, _, adapted, _ = _lora_einsum(tmp_path, "query")
    args[1] = str(adapted)
    assert cli.main([*args, "--target", "proj"]) == 2
    assert "already have a LoRA adapter: proj/kernel (adapter proj/lora_a)" in capsys.readouterr().err


def test_inject_refuses_an_einsum_whose_rows_need_a_transpose(tmp_path):
    keras.utils.set_random_seed(0)
    inp = keras.Input((None, 8))
    model = keras.Model(inp, keras.layers.EinsumDense("abc,cde->abed", (None, 3, 2), name="odd")(inp))
    model.export(tmp_path / "model", verbose=False)
    with pytest.raises(
        RewriteError, match=r"nothing written; weight 'odd/kernel': .*equation 'abc,cde->abed'"
    ) as e:
        tf_lora.rewrite.inject(tmp_path / "model", tmp_path / "out", target="odd", rank=2, alpha=2.0)
    assert "the output with the kernel axes it keeps ('de')" in str(e.value)
    assert "this Einsum's rows would need a transpose" in str(e.value)
    assert not os.path.exists(tmp_path / "out")


def test_swap_adapter_into_einsum_applies(tmp_path):
    # LoraEinsumDense's apply, Gemma's kernel layout: the file's [in, out] adapter is the kernel's view.
    _, layer, src, x = _lora_einsum(tmp_path, "gemma", name="q")
    a = RNG.standard_normal((8, 2)).astype(np.float32)
    b = RNG.standard_normal((2, 6)).astype(np.float32)
    report = tf_lora.rewrite.swap_adapter(
        src, tmp_path / "swapped", {"q": tf_lora.adapters.Adapter(a, b, alpha=1.0)}, strict=True
    )
    assert report.swapped == {"q": "q"}
    loaded = tf.saved_model.load(str(tmp_path / "swapped"))
    y = np.einsum("btd,ndh->btnh", x, layer.kernel.numpy()) + 0.5 * (x.reshape(-1, 8) @ a @ b).reshape(
        2, 5, 2, 3
    )
    np.testing.assert_allclose(loaded.serve(x), y, rtol=1e-5, atol=1e-5)

    # The apply inject put on MultiHeadAttention's query: the layer is "mha/query".
    model, mha, mha_src = _mha(tmp_path)
    tf_lora.rewrite.inject(mha_src, tmp_path / "injected", target="mha/query", rank=3, alpha=3.0)
    a = RNG.standard_normal((8, 2)).astype(np.float32)
    b = RNG.standard_normal((2, 6)).astype(np.float32)
    with pytest.raises(
        RewriteError, match=r"mha/query .*adapter a \[8, 2\], b \[2, 6\]; the model's .*\[8, 3\]"
    ):
        tf_lora.rewrite.swap_adapter(
            tmp_path / "injected", tmp_path / "bad", {"mha/query": tf_lora.adapters.Adapter(a, b, alpha=2.0)}
        )
    a = RNG.standard_normal((8, 3)).astype(np.float32)
    b = RNG.standard_normal((3, 6)).astype(np.float32)
    tf_lora.rewrite.swap_adapter(
        tmp_path / "injected",
        tmp_path / "swapped_mha",
        {"mha/query": tf_lora.adapters.Adapter(a, b, alpha=6.0)},
    )
    query = mha._query_dense.kernel
    query.assign(query.numpy() + 2.0 * (a @ b).reshape(8, 2, 3))
    loaded = tf.saved_model.load(str(tmp_path / "swapped_mha"))
    np.testing.assert_allclose(loaded.serve(X), model.predict(X, verbose=0), rtol=1e-4, atol=1e-4)
