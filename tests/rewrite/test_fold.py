"""tf_lora.rewrite.fold and `tf-lora fold`: LoRA applies folded into MatMul weights; stock TF runs it."""

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_lora
from tf_lora.rewrite import RewriteError, cli

RNG = np.random.default_rng(0)


def _var(shape, name):
    return tf.Variable(RNG.standard_normal(shape).astype(np.float32), name=name)


class TwoLayers(tf.Module):
    """x [batch, seq, 6] -> lora_matmul (bias) -> relu -> lora_matmul: leading dims, bias, two adapters."""

    def __init__(self):
        super().__init__()
        self.w1, self.bias1 = _var((6, 5), "w1"), _var((5,), "bias1")
        self.a1, self.b1 = _var((6, 2), "a1"), _var((2, 5), "b1")
        self.w2, self.a2, self.b2 = _var((5, 4), "w2"), _var((5, 3), "a2"), _var((3, 4), "b2")

    @tf.function(input_signature=[tf.TensorSpec([None, None, 6], tf.float32)])
    def __call__(self, x):
        h = tf.nn.relu(tf_lora.lora_matmul(x, self.w1, self.a1, self.b1, 0.5, bias=self.bias1))
        return {"y": tf_lora.lora_matmul(h, self.w2, self.a2, self.b2, 2.0)}

    def numpy(self, x):
        h = np.maximum(
            x @ (self.w1.numpy() + 0.5 * self.a1.numpy() @ self.b1.numpy()) + self.bias1.numpy(), 0
        )
        return h @ (self.w2.numpy() + 2.0 * self.a2.numpy() @ self.b2.numpy())


def _save(module, path, signature=None):
    tf.saved_model.save(module, str(path), signatures=signature or module.__call__)
    return path


def _digest(path):
    """Every file's bytes under path: to show a command left its input alone."""
    h = hashlib.sha256()
    for p in sorted(pathlib.Path(path).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode() + p.read_bytes())
    return h.hexdigest()


def _stock_tf_run(model_dir, x, out_dir):
    """`saved_model_cli run` in a fresh process that never imports tf_lora; returns output y."""
    cli_path = pathlib.Path(sys.executable).parent / "saved_model_cli"
    np.save(out_dir / "x.npy", x)
    done = subprocess.run(
        [
            str(cli_path),
            "run",
            "--dir",
            str(model_dir),
            "--tag_set",
            "serve",
            "--signature_def",
            "serving_default",
            "--inputs",
            f"x={out_dir / 'x.npy'}",
            "--outdir",
            str(out_dir),
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
        timeout=300,
    )
    return done, (np.load(out_dir / "y.npy") if done.returncode == 0 else None)


def test_fold_matches_numpy_and_runs_under_saved_model_cli_without_tf_lora(tmp_path):
    module = TwoLayers()
    src = _save(module, tmp_path / "model")
    before = _digest(src)
    report = tf_lora.rewrite.fold(src, tmp_path / "folded")
    assert sorted((f.weight, f.adapter, f.rank, f.scale) for f in report.folds) == [
        ("w1", "a1", 2, 0.5),
        ("w2", "a2", 3, 2.0),
    ]
    assert _digest(src) == before  # the input is untouched

    x = RNG.standard_normal((2, 3, 6)).astype(np.float32)
    folded = tf.saved_model.load(str(tmp_path / "folded"))
    np.testing.assert_allclose(
        folded.signatures["serving_default"](x=x)["y"], module.numpy(x), rtol=1e-5, atol=1e-5
    )
    differences = tf_lora.rewrite.verify(src, tmp_path / "folded")
    assert 0 <= differences["serving_default"] < 1e-5

    info = tf_lora.rewrite.inspect(tmp_path / "folded")
    assert info["tf_lora_ops"] == [] and info["adapters"] == []
    saved = tf_lora.rewrite.model_files.ModelFiles(tmp_path / "folded")
    assert not [
        op.name for op in saved.meta.meta_info_def.stripped_op_list.op if op.name.startswith("TfLora")
    ]

    (tmp_path / "run").mkdir()
    done, y = _stock_tf_run(tmp_path / "folded", x, tmp_path / "run")
    assert done.returncode == 0, done.stderr[-3000:]
    np.testing.assert_allclose(y, module.numpy(x), rtol=1e-5, atol=1e-5)
    (tmp_path / "run2").mkdir()
    done, _ = _stock_tf_run(src, x, tmp_path / "run2")  # the unfolded model needs tf_lora's ops
    assert done.returncode != 0 and "TfLora>LoraApply" in done.stderr


def _keras_model(merged):
    keras.utils.set_random_seed(2)
    inp = keras.Input((6,))
    lora = tf_lora.layers.LoraDense(5, rank=2, alpha=4, activation="relu", name="lora")
    model = keras.Model(inp, keras.layers.Dense(3, name="head")(lora(inp)))
    lora.lora_b.assign(RNG.standard_normal((2, 5)).astype(np.float32))
    if merged:
        lora.merge()  # scale 0 in the graph: folding adds nothing
    return model


@pytest.mark.parametrize("merged", [False, True], ids=["attached", "merged"])
def test_fold_keras_export(tmp_path, merged):
    model = _keras_model(merged)
    x = RNG.standard_normal((4, 6)).astype(np.float32)
    expected = model.predict(x, verbose=0)
    model.export(tmp_path / "exported", verbose=False)
    report = tf_lora.rewrite.fold(tmp_path / "exported", tmp_path / "folded")
    assert [(f.weight, f.scale) for f in report.folds] == [("lora/kernel", 0.0 if merged else 2.0)]
    served = tf.saved_model.load(str(tmp_path / "folded"))
    np.testing.assert_allclose(served.serve(x), expected, rtol=1e-5, atol=1e-5)
    assert max(tf_lora.rewrite.verify(tmp_path / "exported", tmp_path / "folded").values()) < 1e-5


class Chained(tf.Module):
    """Two adapters on one MatMul (y = x W + s1 x A1 B1 + s2 x A2 B2)."""

    def __init__(self):
        super().__init__()
        self.w = _var((6, 4), "w")
        self.a1, self.b1 = _var((6, 2), "sql_a"), _var((2, 4), "sql_b")
        self.a2, self.b2 = _var((6, 3), "chat_a"), _var((3, 4), "chat_b")

    @tf.function(input_signature=[tf.TensorSpec([None, 6], tf.float32)])
    def __call__(self, x):
        y = tf_lora.lora_matmul(x, self.w, self.a1, self.b1, 1.5)
        return {"y": tf_lora.lora_apply(y, x, self.a2, self.b2, 0.25)}


def test_adapter_option_folds_one_adapter_and_drops_the_other(tmp_path):
    module = Chained()
    src = _save(module, tmp_path / "model")
    x = RNG.standard_normal((3, 6)).astype(np.float32)
    w, sql, chat = module.w.numpy(), 1.5 * module.a1.numpy() @ module.b1.numpy(), 0.25 * module.a2 @ module.b2
    for adapter, weight in ((None, w + sql + chat), ("sql", w + sql), ("chat", w + chat)):
        out = tmp_path / f"folded_{adapter}"
        report = tf_lora.rewrite.fold(src, out, adapter=adapter)
        assert sorted((f.adapter, f.folded) for f in report.folds) == [
            ("chat_a", adapter in (None, "chat")),
            ("sql_a", adapter in (None, "sql")),
        ]
        y = tf.saved_model.load(str(out)).signatures["serving_default"](x=x)["y"]
        np.testing.assert_allclose(y, x @ weight, rtol=1e-5, atol=1e-5)


class SharedWeight(tf.Module):
    """w feeds a LoRA MatMul and a plain one: folding would change the plain one."""

    def __init__(self):
        super().__init__()
        self.w, self.a, self.b = _var((6, 6), "shared_w"), _var((6, 2), "a"), _var((2, 6), "b")

    @tf.function(input_signature=[tf.TensorSpec([None, 6], tf.float32)])
    def __call__(self, x):
        return {"y": tf.matmul(tf_lora.lora_matmul(x, self.w, self.a, self.b, 1.0), self.w)}


class Batched(tf.Module):
    def __init__(self):
        super().__init__()
        self.w, self.a, self.b = _var((6, 4), "w"), _var((2, 6, 2), "a"), _var((2, 2, 4), "b")

    @tf.function(input_signature=[tf.TensorSpec([None, 6], tf.float32), tf.TensorSpec([None], tf.int32)])
    def __call__(self, x, ids):
        return {"y": tf_lora.batched_lora_matmul(x, self.w, self.a, self.b, ids, [1.0, 1.0])}


class WithGradient(tf.Module):
    """The signature also returns a gradient: LoraApplyGrad reads the apply's second output, x @ a."""

    def __init__(self):
        super().__init__()
        self.w, self.a, self.b = _var((6, 4), "w"), _var((6, 2), "a"), _var((2, 4), "b")

    @tf.function(input_signature=[tf.TensorSpec([None, 6], tf.float32)])
    def __call__(self, x):
        with tf.GradientTape() as tape:
            y = tf_lora.lora_matmul(x, self.w, self.a, self.b, 1.0)
        return {"y": y, "da": tape.gradient(y, self.a)}


@pytest.mark.parametrize(
    ("module", "message"),
    [
        (
            WithGradient,
            r"LoraApply: its x @ a output \(kept for the gradient\) is read by .*LoraApplyGrad.*: "
            "fold a model saved for inference",
        ),
        (
            SharedWeight,
            r"weight 'shared_w' is also read by __inference\w+/MatMul \(MatMul\), which has no LoRA apply",
        ),
        (Batched, r"tf_lora ops that fold does not handle remain: .*TfLora>BatchedLoraApply"),
    ],
)
def test_unsupported_patterns_write_nothing_and_exit_2(tmp_path, module, message, capsys):
    src = _save(module(), tmp_path / "model")
    with pytest.raises(RewriteError, match=message):
        tf_lora.rewrite.fold(src, tmp_path / "out")
    assert cli.main(["fold", str(src), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tf-lora fold: nothing written; ") and "fold: fold:" not in err
    assert sorted(os.listdir(tmp_path)) == ["model"]  # no output, no staging directory left


def test_bad_inputs_give_clean_errors(tmp_path, capsys):
    src = _save(TwoLayers(), tmp_path / "model")
    assert cli.main(["fold", str(tmp_path / "missing"), str(tmp_path / "o")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["inspect", str(tmp_path / "empty")]) == 2
    assert "not a SavedModel directory (no saved_model.pb)" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "saved_model.pb").write_bytes(b"\x08\xff\xff this is not a proto")
    assert cli.main(["inspect", str(corrupt)]) == 2
    assert "corrupted SavedModel proto" in capsys.readouterr().err

    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "keep.txt").write_text("mine")
    assert cli.main(["fold", str(src), str(tmp_path / "exists"), "--quiet"]) == 2
    assert "exists (pass --overwrite" in capsys.readouterr().err
    assert os.listdir(tmp_path / "exists") == ["keep.txt"]
    assert cli.main(["fold", str(src), str(tmp_path / "exists"), "--quiet", "--overwrite", "--verify"]) == 0
    assert "saved_model.pb" in os.listdir(tmp_path / "exists")

    with pytest.raises(RewriteError, match=r"no signature \['nope'\] in both models"):
        tf_lora.rewrite.verify(src, tmp_path / "exists", signatures=["nope"])


def test_cli_inspect_and_verify_output(tmp_path, capsys):
    src = _save(TwoLayers(), tmp_path / "model")
    assert cli.main(["inspect", str(src), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["signatures"]["serving_default"]["inputs"] == {
        "x": {"dtype": "float32", "shape": [None, None, 6]}
    }
    assert sorted((a["weight"], a["weight_shape"], a["rank"], a["scale"]) for a in info["adapters"]) == [
        ("w1", [6, 5], 2, 0.5),
        ("w2", [5, 4], 3, 2.0),
    ]
    assert len(info["tf_lora_ops"]) == 2 and info["matmul_candidates"] == []
    assert cli.main(["inspect", str(src)]) == 0
    assert "a1 on w1 [6, 5]: rank 2, scale 0.5" in capsys.readouterr().out

    assert cli.main(["fold", str(src), str(tmp_path / "out"), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "a2 (rank 3, scale 2) folded into w2" in out
    assert "verify serving_default: max |difference| = " in out
    assert cli.main(["fold", str(src), str(tmp_path / "out2"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "command", [[], ["inspect"], ["fold"], ["inject"], ["swap-adapter"], ["replace-embedding"]]
)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main([*command, "--help"])
    assert done.value.code == 0
    assert "usage: tf-lora" in capsys.readouterr().out


def _multi_adapter_keras(tmp_path, with_ids):
    """A LoraDense with adapters default (rank 2), sql (rank 3) and chat (rank 1), random B; exported with or
    without per-example adapter ids as a second input. Returns (model, layer, exported dir)."""
    keras.utils.set_random_seed(4)
    x_in = keras.Input((6,))
    layer = tf_lora.layers.LoraDense(
        5,
        rank=2,
        alpha=4,
        name="lora",
        adapters=[{"name": "sql", "rank": 3, "alpha": 3}, {"name": "chat", "rank": 1, "alpha": 1}],
    )
    if with_ids:
        ids_in = keras.Input((), dtype="int32")
        model = keras.Model([x_in, ids_in], layer(x_in, adapter_ids=ids_in))
    else:
        model = keras.Model(x_in, layer(x_in))
    for slot in layer._slots.values():
        slot.b.assign(RNG.standard_normal(slot.b.shape).astype(np.float32))
    return model, layer


def test_fold_multi_adapter_layer_folds_the_active_or_the_chosen_adapter(tmp_path):
    model, layer = _multi_adapter_keras(tmp_path, with_ids=False)
    layer.set_active_adapter("sql")
    x = RNG.standard_normal((4, 6)).astype(np.float32)
    model.export(tmp_path / "model", verbose=False)
    info = tf_lora.rewrite.inspect(tmp_path / "model")
    assert [(a["adapter"], a["batch_index"], a["rank"]) for a in info["adapters"]] == [
        ("lora/lora_a", 0, 2),
        ("lora/lora_a_sql", 1, 3),
        ("lora/lora_a_chat", 2, 1),
    ]
    report = tf_lora.rewrite.fold(tmp_path / "model", tmp_path / "active")  # the active adapter: sql
    assert [(f.adapter, f.folded) for f in report.folds] == [("lora/lora_a_sql", True)]
    assert max(tf_lora.rewrite.verify(tmp_path / "model", tmp_path / "active").values()) < 1e-5
    expected = {}
    for name in ("chat", None):
        layer.set_active_adapter(name)
        expected[name] = model.predict(x, verbose=0)
    tf_lora.rewrite.fold(tmp_path / "model", tmp_path / "chat", adapter="chat")
    served = tf.saved_model.load(str(tmp_path / "chat"))
    np.testing.assert_allclose(served.serve(x), expected["chat"], rtol=1e-5, atol=1e-5)
    with pytest.raises(RewriteError, match=r"--adapter matches several of its adapters"):
        tf_lora.rewrite.fold(tmp_path / "model", tmp_path / "two", adapter="sql|chat")


def test_fold_per_example_ids_needs_an_adapter_choice(tmp_path):
    model, layer = _multi_adapter_keras(tmp_path, with_ids=True)
    model.export(tmp_path / "model", verbose=False)
    with pytest.raises(RewriteError, match=r"per-example ids\); pick the one to fold with --adapter"):
        tf_lora.rewrite.fold(tmp_path / "model", tmp_path / "out")
    tf_lora.rewrite.fold(tmp_path / "model", tmp_path / "out", adapter="lora_a_sql")
    x = RNG.standard_normal((4, 6)).astype(np.float32)
    everyone_sql = model.predict([x, np.ones(4, np.int32)], verbose=0)
    served = tf.saved_model.load(str(tmp_path / "out"))
    np.testing.assert_allclose(served.serve([x, -np.ones(4, np.int32)]), everyone_sql, rtol=1e-5, atol=1e-5)
