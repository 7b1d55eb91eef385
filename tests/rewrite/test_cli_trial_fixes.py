"""What a user trial of the `tf-lora` command found, each with the test that failed before its fix: adapter
files whose parts swap-adapter cannot write, crashes on a truncated checkpoint or a bad --map replacement,
non-finite --alpha, mixed-precision models, multi-adapter layers, SIGTERM, a missing checkpoint, TF1
resource lookups in inspect, and messages that sent users the wrong way."""

import json
import os
import pathlib
import shutil
import signal

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_cli import Adapted, _save
from test_swap_adapter import FIXTURES, _exported

import tf_lora
from tf_lora.rewrite import RewriteError, cli


def _json_failure(capsys):
    printed = capsys.readouterr()
    report = json.loads(printed.out)
    assert report["ok"] is False and report["exit_code"] in (2, 130, 143)
    return report["error"], printed.err


@pytest.mark.parametrize(
    "fixture, message",
    [
        ("peft_dora", "q: a DoRA adapter \\(its magnitude vector\\)"),
        ("peft_lora_only_bias", "q: a trained bias"),
        ("peft_lora_only_bias", r"whole modules the file replaces \(modules_to_save\) \['v'\]"),
        ("peft_all_bias", "out: a trained bias"),
    ],
)
def test_swap_adapter_refuses_what_it_cannot_write(tmp_path, fixture, message):
    # It wrote A, B and the scale and dropped the rest: exit 0 with outputs 1.7 to 4.5 off.
    src = _exported(tmp_path, FIXTURES / "peft_f32", {"q": 2, "v": 3, "out": 2})
    with pytest.raises(RewriteError, match="nothing written; .*" + message):
        tf_lora.rewrite.swap_adapter(src, tmp_path / "out", FIXTURES / fixture)
    assert not os.path.exists(tmp_path / "out")


def test_swap_adapter_refuses_a_model_whose_adapter_is_dora(tmp_path):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,))
    layer = tf_lora.layers.LoraDense(6, rank=2, use_dora=True, name="q")
    keras.Model(inputs, layer(inputs)).export(tmp_path / "model", verbose=False)
    rng = np.random.default_rng(0)
    adapter = tf_lora.adapters.Adapter(
        a=rng.standard_normal((8, 2)).astype(np.float32),
        b=rng.standard_normal((2, 6)).astype(np.float32),
        alpha=2,
    )
    with pytest.raises(RewriteError, match="q -> q: the model's adapter there is DoRA"):
        tf_lora.rewrite.swap_adapter(tmp_path / "model", tmp_path / "out", {"q": adapter})


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_multi_adapter_layers_say_so_and_fold_reports_each_adapter_s_rank(tmp_path, policy):
    keras.mixed_precision.set_global_policy(policy)
    try:
        keras.utils.set_random_seed(0)
        inputs = keras.Input((8,))
        layer = tf_lora.layers.LoraDense(6, rank=4, name="q")
        model = keras.Model(inputs, layer(inputs))
        layer.add_adapter("sql", rank=2)
        model.export(tmp_path / "model", verbose=False)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    rng = np.random.default_rng(0)
    adapter = tf_lora.adapters.Adapter(
        a=rng.standard_normal((8, 2)).astype(np.float32),
        b=rng.standard_normal((2, 6)).astype(np.float32),
        alpha=2,
    )
    with pytest.raises(
        RewriteError, match=r"q -> q: that layer holds several adapters \(a BatchedLoraApply\)"
    ):
        tf_lora.rewrite.swap_adapter(tmp_path / "model", tmp_path / "out", {"q": adapter})
    report = tf_lora.rewrite.fold(tmp_path / "model", tmp_path / "folded", adapter="sql")
    assert [(f.adapter, f.rank) for f in report.folds if f.folded] == [
        ("q/lora_a_sql", 2)
    ]  # not the stack's 4


def test_truncated_checkpoint_is_a_clean_error(tmp_path, capsys):
    # An interrupted copy: reading the data file raised IndexError, a traceback with exit 1 and no JSON.
    src = _save(Adapted(), tmp_path / "model")
    data = next(pathlib.Path(src, "variables").glob("variables.data-*"))
    data.write_bytes(data.read_bytes()[:64])
    for argv in (["inspect", str(src)], ["fold", str(src), str(tmp_path / "out")]):
        assert cli.main([*argv, "--json"]) == 2
        error, _ = _json_failure(capsys)
        assert "unreadable checkpoint" in error
    assert not os.path.exists(tmp_path / "out")


def test_missing_checkpoint_is_named(tmp_path, capsys):
    src = _save(Adapted(), tmp_path / "model")
    os.remove(os.path.join(src, "variables", "variables.index"))
    assert cli.main(["inspect", str(src), "--json"]) == 2  # it said every adapter was "not foldable"
    error, _ = _json_failure(capsys)
    assert "its variables are missing: no checkpoint" in error


@pytest.mark.parametrize("replacement", [r"\2", r"\g<name>"])
def test_bad_map_replacement_is_a_clean_error(tmp_path, capsys, replacement):
    src = _exported(tmp_path, FIXTURES / "peft_f32", {"q": 2, "v": 3, "out": 2})
    argv = ["swap-adapter", str(src), str(tmp_path / "out"), "--adapter", str(FIXTURES / "peft_f32")]
    assert cli.main([*argv, "--map", f"(q|v)={replacement}", "--json"]) == 2  # re.error / IndexError before
    error, _ = _json_failure(capsys)
    assert "the mapping's replacement for module 'q' is not valid" in error
    # A pattern with a global flag is fine (an earlier check of the replacement wrapped it and refused it).
    assert cli.main([*argv, "--map", r"(?i)(Q|V|OUT)=\1"]) == 0
    shutil.rmtree(tmp_path / "out")


@pytest.mark.parametrize("alpha", ["nan", "inf", "-inf"])
def test_inject_refuses_a_non_finite_alpha(tmp_path, capsys, alpha):
    # It wrote a model whose every call failed with "scale must be finite".
    src = _save(Adapted(), tmp_path / "model")
    argv = ["inject", str(src), str(tmp_path / "out"), "--target", "w2", "--rank", "2", f"--alpha={alpha}"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--json"])
    assert exit_info.value.code == 2
    error, _ = _json_failure(capsys)  # usage errors print the JSON failure too
    assert "wants a finite number" in error
    assert not os.path.exists(tmp_path / "out")


def test_runtime_errors_keep_their_reason():
    with pytest.raises(tf.errors.InvalidArgumentError) as caught:
        tf.function(
            lambda: tf_lora.lora_apply(
                tf.zeros([1, 2]), tf.zeros([1, 2]), tf.zeros([2, 1]), tf.zeros([1, 2]), np.nan
            )
        )()
    message = cli._io_message(caught.value)  # it kept the first line: "Graph execution error:"
    assert "scale must be finite" in message and "Graph execution error" not in message


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_models_fold_and_inject_says_why_not(tmp_path, capsys, policy):
    # The kernel reaches its MatMul through a Cast: fold said it "does not multiply by a saved variable".
    keras.mixed_precision.set_global_policy(policy)
    try:
        keras.utils.set_random_seed(0)
        inputs = keras.Input((16,))
        layer = tf_lora.layers.LoraDense(8, rank=2, name="fc1")
        hidden = layer(inputs)
        model = keras.Model(inputs, keras.layers.Dense(4, dtype="float32", name="head")(hidden))
        layer.lora_b.assign(np.random.default_rng(1).standard_normal(layer.lora_b.shape) * 0.3)
        x = np.random.default_rng(2).standard_normal((5, 16)).astype(np.float32)
        model.export(tmp_path / "lora", verbose=False)
        plain_inputs = keras.Input((16,))
        plain = keras.Model(plain_inputs, keras.layers.Dense(8, name="fc1")(plain_inputs))
        plain.export(tmp_path / "plain", verbose=False)
        # The reference: the same weights merged, run at the same policy.
        layer.merge()
        expected = model(x).numpy()
        size = float(np.abs(expected).max())
    finally:
        keras.mixed_precision.set_global_policy("float32")
    tolerance = {"mixed_float16": "2e-3", "mixed_bfloat16": "2e-2"}[policy]
    assert cli.main(["fold", str(tmp_path / "lora"), str(tmp_path / "strict"), "--verify"]) == 2
    assert "whose rounding alone moves outputs" in capsys.readouterr().err
    assert (
        cli.main(
            ["fold", str(tmp_path / "lora"), str(tmp_path / "out"), "--verify", "--tolerance", tolerance]
        )
        == 0
    )
    capsys.readouterr()
    loaded = tf.saved_model.load(str(tmp_path / "out"))  # held: its functions need its variables
    served = loaded.serve(x).numpy()
    np.testing.assert_allclose(served, expected, rtol=float(tolerance), atol=float(tolerance) * size)
    argv = ["inject", str(tmp_path / "plain"), str(tmp_path / "inj"), "--target", "fc1", "--rank", "2"]
    assert cli.main([*argv, "--alpha", "4"]) == 2
    assert (
        "weights cast to another dtype before their MatMul or Einsum ['fc1/kernel']"
        in capsys.readouterr().err
    )


def test_sigterm_removes_the_staging_directory(tmp_path, capsys, monkeypatch):
    # timeout, kill or a cancelled job left .OUT.tf_lora_stage_<pid> with a whole model copy behind.
    src = _save(Adapted(), tmp_path / "model")
    real_fold, handler = tf_lora.rewrite.fold, signal.getsignal(signal.SIGTERM)

    def fold_then_killed(model, out, **kwargs):
        report = real_fold(model, out, **kwargs)
        assert os.listdir(out)  # the staging copy is written
        os.kill(os.getpid(), signal.SIGTERM)
        return report

    monkeypatch.setattr(tf_lora.rewrite, "fold", fold_then_killed)
    assert cli.main(["fold", str(src), str(tmp_path / "out"), "--json"]) == 143
    error, _ = _json_failure(capsys)
    assert error == "terminated (SIGTERM); nothing written"
    assert sorted(os.listdir(tmp_path)) == ["model"]
    assert signal.getsignal(signal.SIGTERM) is handler  # put back


def test_tf1_inspect_lists_resource_variable_lookups(tmp_path):
    graph = tf.Graph()
    with graph.as_default():
        ids = tf.compat.v1.placeholder(tf.int32, [None], name="ids")
        table = tf.compat.v1.get_variable("emb", initializer=np.ones((10, 4), np.float32), use_resource=True)
        out = tf.gather(table, ids)
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            tf.compat.v1.saved_model.simple_save(session, str(tmp_path / "tf1"), {"ids": ids}, {"out": out})
    lookups = tf_lora.rewrite.inspect(tmp_path / "tf1")["embedding_lookups"]
    assert [(entry["op"], entry["variable"]) for entry in lookups] == [("ResourceGather", "emb")]


def test_messages_that_pointed_the_wrong_way(tmp_path, capsys):
    (tmp_path / "model.keras").write_bytes(b"PK")
    assert cli.main(["inspect", str(tmp_path / "model.keras")]) == 2
    assert "not a model tf-lora reads" in capsys.readouterr().err  # it said "no such directory"
    src = _exported(tmp_path, FIXTURES / "peft_f32", {"q": 2, "v": 3, "out": 2})
    config = FIXTURES / "peft_f32" / "adapter_config.json"  # read as a kohya file before
    argv = ["swap-adapter", str(src), str(tmp_path / "out"), "--adapter", str(config)]
    assert cli.main(argv) == 0
    shutil.rmtree(tmp_path / "out")


def test_ctrl_c_while_tensorflow_starts_exits_130_without_a_traceback(capsys):
    # `import tf_lora` runs before the command's main: a Ctrl-C in those seconds (TensorFlow importing)
    # printed a traceback and died of SIGINT instead of the command's interrupted line and status 130.
    import contextlib  # noqa: PLC0415

    from tf_lora import _quiet  # noqa: PLC0415

    with pytest.raises(SystemExit) as exit_info:
        with _quiet.interrupted_start(contextlib.nullcontext(), ["densify", "m", "out", "--json"]):
            raise KeyboardInterrupt
    assert exit_info.value.code == 130
    captured = capsys.readouterr()
    assert captured.err.strip() == "tf-lora densify: interrupted while starting; nothing written"
    assert json.loads(captured.out) == {
        "command": "densify",
        "ok": False,
        "error": "interrupted while starting; nothing written",
        "exit_code": 130,
    }
