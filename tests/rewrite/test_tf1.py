"""The rewrite commands on TF1 graphs: SavedModels written by simple_save, and MetaGraphDef files with their
checkpoints written by tf.compat.v1.train.Saver, with resource and reference variables."""

import os
import pathlib

import numpy as np
import pytest
import tensorflow as tf
from safetensors.tensorflow import load_file

import tf_lora
from tf_lora.rewrite import RewriteError, cli

FIXTURES = pathlib.Path(__file__).parent.parent / "adapters" / "fixtures"
v1 = tf.compat.v1


def _tf1_model(tmp_path, resource, signature=True):
    """y = relu(x @ dense/kernel + bias + 1.5 x A B) @ head/kernel, saved as a TF1 SavedModel (model_v1/)
    and as a MetaGraphDef + checkpoint (ckpt/model.meta). Returns the numpy function it computes."""
    rng = np.random.default_rng(0)
    values = {
        "dense/kernel": rng.standard_normal((6, 5)),
        "dense/bias": rng.standard_normal(5),
        "dense/lora_a": rng.standard_normal((6, 2)),
        "dense/lora_b": rng.standard_normal((2, 5)),
        "head/kernel": rng.standard_normal((5, 3)),
    }
    values = {k: v.astype(np.float32) for k, v in values.items()}
    graph = tf.Graph()
    with graph.as_default():
        x = v1.placeholder(tf.float32, [None, 6], name="x")
        var = {k: v1.get_variable(k, initializer=v, use_resource=resource) for k, v in values.items()}
        h = tf_lora.lora_matmul(
            x, var["dense/kernel"], var["dense/lora_a"], var["dense/lora_b"], 1.5, bias=var["dense/bias"]
        )
        y = tf.identity(tf.matmul(tf.nn.relu(h), var["head/kernel"]), name="y")
        with v1.Session(graph=graph) as session:
            session.run(v1.global_variables_initializer())
            v1.saved_model.simple_save(session, str(tmp_path / "model_v1"), inputs={"x": x}, outputs={"y": y})
            v1.train.Saver().save(session, str(tmp_path / "ckpt" / "model"))
            if signature:  # .meta files from Saver.save carry no signature; add one as an exporter would
                meta = v1.train.export_meta_graph()
                meta.signature_def["serving_default"].CopyFrom(
                    v1.saved_model.signature_def_utils.predict_signature_def({"x": x}, {"y": y})
                )
                (tmp_path / "ckpt" / "model.meta").write_bytes(meta.SerializeToString())

    def reference(xv):
        w = values["dense/kernel"] + 1.5 * values["dense/lora_a"] @ values["dense/lora_b"]
        return np.maximum(xv @ w + values["dense/bias"], 0) @ values["head/kernel"]

    return reference


def _run_v1_saved_model(path, xv):
    with tf.Graph().as_default() as graph, v1.Session(graph=graph) as session:
        meta = v1.saved_model.loader.load(session, ["serve"], str(path))
        sig = meta.signature_def["serving_default"]
        return session.run(sig.outputs["y"].name, {sig.inputs["x"].name: xv})


@pytest.mark.parametrize("resource", [True, False], ids=["resource", "ref"])
def test_fold_tf1_saved_model(tmp_path, resource):
    reference = _tf1_model(tmp_path, resource)
    info = tf_lora.rewrite.inspect(tmp_path / "model_v1")
    assert [(a["weight"], a["rank"], a["scale"]) for a in info["adapters"]] == [("dense/kernel", 2, 1.5)]
    assert [m["weight"] for m in info["matmul_candidates"]] == ["head/kernel"]
    report = tf_lora.rewrite.fold(tmp_path / "model_v1", tmp_path / "folded")
    assert [(f.function, f.weight) for f in report.folds] == [("graph", "dense/kernel")]
    assert tf_lora.rewrite.verify(tmp_path / "model_v1", tmp_path / "folded")["serving_default"] < 1e-5
    assert tf_lora.rewrite.inspect(tmp_path / "folded")["tf_lora_ops"] == []
    xv = np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32)
    np.testing.assert_allclose(
        _run_v1_saved_model(tmp_path / "folded", xv), reference(xv), rtol=1e-5, atol=1e-5
    )


def test_fold_tf1_meta_graph_with_checkpoint_through_the_cli(tmp_path, capsys):
    reference = _tf1_model(tmp_path, resource=True)
    meta = str(tmp_path / "ckpt" / "model.meta")
    assert cli.main(["fold", meta, str(tmp_path / "out"), "--verify"]) == 0
    assert "verify serving_default: max |difference| = " in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "out")) == [
        "checkpoint",
        "model.data-00000-of-00001",
        "model.index",
        "model.meta",
    ]
    with tf.Graph().as_default() as graph, v1.Session(graph=graph) as session:
        v1.train.import_meta_graph(str(tmp_path / "out" / "model.meta")).restore(
            session, v1.train.latest_checkpoint(str(tmp_path / "out"))
        )
        xv = np.ones((2, 6), np.float32)
        np.testing.assert_allclose(session.run("y:0", {"x:0": xv}), reference(xv), rtol=1e-5, atol=1e-5)


def test_meta_graph_without_signatures_folds_but_cannot_verify(tmp_path):
    _tf1_model(tmp_path, resource=True, signature=False)
    meta = tmp_path / "ckpt" / "model.meta"
    tf_lora.rewrite.fold(meta, tmp_path / "out")
    with pytest.raises(RewriteError, match="has no signatures to run"):
        tf_lora.rewrite.verify(meta, tmp_path / "out")
    os.remove(tmp_path / "ckpt" / "model.index")
    with pytest.raises(RewriteError, match=r"no checkpoint beside it \(.*model.index\)"):
        tf_lora.rewrite.fold(meta, tmp_path / "out2")


def test_swap_adapter_tf1_gives_peft_output(tmp_path):
    """PEFT's fixture model built in a TF1 graph with LoRA ranks 2, 3, 2: the PEFT file swapped in."""
    base = {k: v.numpy() for k, v in load_file(str(FIXTURES / "peft_f32" / "base.safetensors")).items()}
    io = {k: v.numpy() for k, v in load_file(str(FIXTURES / "peft_f32" / "io.safetensors")).items()}
    graph = tf.Graph()
    with graph.as_default():
        x = v1.placeholder(tf.float32, [None, 8], name="x")

        def dense(name, h, rank, units):
            kernel = v1.get_variable(f"{name}/kernel", initializer=base[f"{name}.weight"].T)
            bias = v1.get_variable(f"{name}/bias", initializer=base[f"{name}.bias"])
            a = v1.get_variable(f"{name}/lora_a", initializer=np.ones((h.shape[-1], rank), np.float32))
            b = v1.get_variable(f"{name}/lora_b", initializer=np.ones((rank, units), np.float32))
            return tf_lora.lora_matmul(h, kernel, a, b, 1.0, bias=bias)

        y = dense("out", tf.nn.relu(dense("q", x, 2, 6) + dense("v", x, 3, 6)), 2, 4)
        with v1.Session(graph=graph) as session:
            session.run(v1.global_variables_initializer())
            v1.saved_model.simple_save(session, str(tmp_path / "model"), inputs={"x": x}, outputs={"y": y})
    report = tf_lora.rewrite.swap_adapter(tmp_path / "model", tmp_path / "swapped", FIXTURES / "peft_f32")
    assert report.swapped == {"out": "out", "q": "q", "v": "v"}
    np.testing.assert_allclose(
        _run_v1_saved_model(tmp_path / "swapped", io["x"]), io["y"], rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("resource", [True, False], ids=["resource", "ref"])
def test_inject_then_fold_tf1_saved_model(tmp_path, resource):
    _tf1_model(tmp_path, resource)
    src = tmp_path / "model_v1"
    report = tf_lora.rewrite.inject(src, tmp_path / "injected", target="head", rank=2, alpha=4.0)
    assert [(i.weight, i.a, i.shape) for i in report] == [("head/kernel", "head/kernel/lora_a", (5, 3))]
    assert tf_lora.rewrite.verify(src, tmp_path / "injected") == {"serving_default": 0.0}
    adapters = tf_lora.rewrite.inspect(tmp_path / "injected")["adapters"]
    assert sorted((a["weight"], a["rank"], a["scale"]) for a in adapters) == [
        ("dense/kernel", 2, 1.5),
        ("head/kernel", 2, 2.0),
    ]
    with tf.Graph().as_default() as graph, v1.Session(graph=graph) as session:
        v1.saved_model.loader.load(session, ["serve"], str(tmp_path / "injected"))
        trainable = {v.op.name: v for v in v1.trainable_variables()}
        assert {"head/kernel/lora_a", "head/kernel/lora_b"} <= set(trainable)
        np.testing.assert_array_equal(session.run(trainable["head/kernel/lora_b"]), 0)
    tf_lora.rewrite.fold(tmp_path / "injected", tmp_path / "folded")  # both adapters: dense's is not zero
    assert tf_lora.rewrite.verify(src, tmp_path / "folded")["serving_default"] < 1e-5
    assert tf_lora.rewrite.inspect(tmp_path / "folded")["tf_lora_ops"] == []


def test_inject_tf1_meta_graph_through_the_cli(tmp_path, capsys):
    _tf1_model(tmp_path, resource=True)
    meta = str(tmp_path / "ckpt" / "model.meta")
    assert (
        cli.main(["inject", meta, str(tmp_path / "out"), "--target", "head", "--rank", "3", "--alpha", "3"])
        == 0
    )
    assert cli.main(["fold", str(tmp_path / "out" / "model.meta"), str(tmp_path / "folded"), "--verify"]) == 0
    assert tf_lora.rewrite.verify(meta, tmp_path / "folded")["serving_default"] < 1e-5
    capsys.readouterr()


def _tf1_recommender(tmp_path, resource):
    rng = np.random.default_rng(0)
    users = rng.standard_normal((10, 4)).astype(np.float32)
    w = rng.standard_normal((4, 2)).astype(np.float32)
    graph = tf.Graph()
    with graph.as_default():
        ids = v1.placeholder(tf.int32, [None], name="ids")
        table = v1.get_variable("user_emb", initializer=users, use_resource=resource)
        head = v1.get_variable("w", initializer=w, use_resource=resource)
        u = tf.nn.embedding_lookup(table, ids)
        score = tf.matmul(u, head)
        with v1.Session(graph=graph) as session:
            session.run(v1.global_variables_initializer())
            v1.saved_model.simple_save(
                session, str(tmp_path / "model"), inputs={"ids": ids}, outputs={"score": score, "u": u}
            )
    return users, w


@pytest.mark.parametrize("resource", [True, False], ids=["resource", "ref"])
def test_replace_embedding_tf1(tmp_path, resource):
    users, w = _tf1_recommender(tmp_path, resource)
    report = tf_lora.rewrite.replace_embedding(tmp_path / "model", tmp_path / "out", target="user_emb")
    assert [(r.variable, r.shape) for r in report] == [("user_emb", (10, 4))]
    assert tf_lora.rewrite.verify(tmp_path / "model", tmp_path / "out") == {"serving_default": 0.0}
    ops = {op["op"] for op in tf_lora.rewrite.inspect(tmp_path / "out")["tf_lora_ops"]}
    assert "TfLora>SparseTablePull" in ops
    with tf.Graph().as_default() as graph, v1.Session(graph=graph) as session:
        meta = v1.saved_model.loader.load(session, ["serve"], str(tmp_path / "out"))
        sig = meta.signature_def["serving_default"]
        ids = np.array([9, 0, 3], np.int32)
        u = session.run(sig.outputs["u"].name, {sig.inputs["ids"].name: ids})
        np.testing.assert_array_equal(u, users[ids])


@pytest.mark.parametrize("as_text", [False, True], ids=["pb", "pbtxt"])
def test_fold_bare_graph_def_with_checkpoint(tmp_path, as_text):
    """A GraphDef file with a checkpoint beside it under the same name: folded weights in the new one."""
    rng = np.random.default_rng(0)
    values = {
        k: rng.standard_normal(s).astype(np.float32) for k, s in (("w", (6, 4)), ("a", (6, 2)), ("b", (2, 4)))
    }
    graph = tf.Graph()
    with graph.as_default():
        x = v1.placeholder(tf.float32, [None, 6], name="x")
        var = {k: v1.get_variable(k, initializer=v) for k, v in values.items()}
        tf.identity(tf_lora.lora_matmul(x, var["w"], var["a"], var["b"], 0.5), name="y")
        with v1.Session(graph=graph) as session:
            session.run(v1.global_variables_initializer())
            v1.train.Saver().save(session, str(tmp_path / "model"), write_meta_graph=False)
        name = "model.pbtxt" if as_text else "model.pb"
        tf.io.write_graph(graph.as_graph_def(), str(tmp_path), name, as_text=as_text)
    report = tf_lora.rewrite.fold(tmp_path / name, tmp_path / "out")
    assert [(f.weight, f.scale) for f in report.folds] == [("w", 0.5)]
    assert sorted(os.listdir(tmp_path / "out")) == [
        "checkpoint",
        "model.data-00000-of-00001",
        "model.index",
        "model.pb",
    ]
    reader = tf.train.load_checkpoint(str(tmp_path / "out" / "model"))
    np.testing.assert_allclose(
        reader.get_tensor("w"), values["w"] + 0.5 * values["a"] @ values["b"], rtol=1e-6
    )
    folded = tf_lora.rewrite.model_files.ModelFiles(tmp_path / "out" / "model.pb")
    assert tf_lora.rewrite.graph_defs.plugin_nodes(folded.meta) == []
    with pytest.raises(RewriteError, match="bare GraphDef, with no signatures to run"):
        tf_lora.rewrite.verify(tmp_path / name, tmp_path / "out")
    with pytest.raises(RewriteError, match="needs a MetaGraphDef"):
        tf_lora.rewrite.inject(tmp_path / name, tmp_path / "inj", target="w", rank=2, alpha=2.0)
