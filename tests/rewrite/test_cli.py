"""`tf-lora` as a command: what it leaves at OUT when it fails, what goes to stdout and to stderr, its --json
reports, its exit codes, and how loud TensorFlow may be."""

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
from test_fold import Chained  # two adapters on one MatMul (sql_a, chat_a)

import tf_lora
from tf_lora.rewrite import RewriteError, cli

RNG = np.random.default_rng(0)


def _var(shape, name):
    return tf.Variable(RNG.standard_normal(shape).astype(np.float32), name=name)


class Adapted(tf.Module):
    """y = (x W1 + 0.5 x A1 B1) W2: w1 carries adapter a1, w2 is a plain MatMul weight."""

    def __init__(self):
        super().__init__()
        self.w1, self.a1, self.b1 = _var((6, 5), "w1"), _var((6, 2), "a1"), _var((2, 5), "b1")
        self.w2 = _var((5, 4), "w2")

    @tf.function(input_signature=[tf.TensorSpec([None, 6], tf.float32)])
    def __call__(self, x):
        return {"y": tf.matmul(tf_lora.lora_matmul(x, self.w1, self.a1, self.b1, 0.5), self.w2)}


class Noisy(Adapted):
    """Adapted with a second output drawn at random on every call: no rewrite of it passes --verify."""

    @tf.function(input_signature=[tf.TensorSpec([None, 6], tf.float32)])
    def __call__(self, x):
        y = tf.matmul(tf_lora.lora_matmul(x, self.w1, self.a1, self.b1, 0.5), self.w2)
        # Seeds 0, 0 in the graph: random at every run, whatever global seed an earlier test set (with one,
        # tf.random.uniform would get fixed seeds, the same in the rewritten copy, and verify would pass).
        noise = tf.raw_ops.RandomUniform(shape=tf.shape(y), dtype=tf.float32, seed=0, seed2=0)
        return {"y": y, "noise": noise}


class Lookup(tf.Module):
    def __init__(self):
        super().__init__()
        self.emb = _var((10, 4), "user_emb")

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int32)])
    def __call__(self, ids):
        return {"u": tf.gather(self.emb, ids)}


def _save(module, path):
    tf.saved_model.save(module, str(path), signatures=module.__call__)
    return str(path)


def _digest(path):
    h = hashlib.sha256()
    for p in sorted(pathlib.Path(path).rglob("*")):
        h.update(str(p.relative_to(path)).encode() + (p.read_bytes() if p.is_file() else b"/"))
    return h.hexdigest()


def _run(capsys, *argv):
    """(exit status, stdout, stderr) of `tf-lora argv`."""
    code = cli.main([str(a) for a in argv])
    printed = capsys.readouterr()
    return code, printed.out, printed.err


# -- a failed --verify leaves OUT as it was ------------------------------------------------------------------


def test_failed_verify_leaves_nothing_at_out(tmp_path, capsys):
    src = _save(Noisy(), tmp_path / "model")
    out = tmp_path / "out"
    code, stdout, err = _run(capsys, "fold", src, out, "--verify", "--quiet")
    assert code == 2 and stdout == ""
    assert err.startswith("tf-lora fold: verify: signature 'serving_default' output 'noise' differs by ")
    assert err.endswith("; nothing written\n") and err.count("\n") == 1
    assert not os.path.lexists(out)
    assert sorted(os.listdir(tmp_path)) == ["model"]  # no staging directory either

    # A pre-existing OUT, to be replaced (--overwrite): byte for byte as it was.
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (out / "sub").mkdir()
    (out / "sub" / "old.pb").write_bytes(b"\x00old")
    before = _digest(out)
    code, stdout, err = _run(capsys, "fold", src, out, "--verify", "--overwrite", "--quiet", "--json")
    assert code == 2
    assert json.loads(stdout)["ok"] is False and f"; {out} left as it was" in json.loads(stdout)["error"]
    assert err.endswith(f"; {out} left as it was\n")
    assert _digest(out) == before
    assert sorted(os.listdir(tmp_path)) == ["model", "out"]

    # Parents created for OUT go again too.
    code, _, _ = _run(capsys, "fold", src, tmp_path / "new" / "deeper" / "out", "--verify", "--quiet")
    assert code == 2 and not os.path.lexists(tmp_path / "new")

    # The rewrite itself was fine: without --verify it is written.
    assert _run(capsys, "fold", src, tmp_path / "unverified", "--quiet")[0] == 0
    assert os.path.isfile(tmp_path / "unverified" / "saved_model.pb")


def test_passing_verify_replaces_out(tmp_path, capsys):
    src = _save(Adapted(), tmp_path / "model")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    code, _, _ = _run(capsys, "fold", src, tmp_path / "out", "--verify", "--overwrite", "--quiet")
    assert code == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["assets", "fingerprint.pb", "saved_model.pb", "variables"]
    assert sorted(os.listdir(tmp_path)) == ["model", "out"]


# -- fold --adapter that matches nothing ---------------------------------------------------------------------


def test_fold_adapter_matching_no_adapter_is_an_error(tmp_path, capsys):
    src = _save(Chained(), tmp_path / "model")
    message = "--adapter 'lora_z' matches no adapter (adapters: ['chat_a', 'sql_a'])"
    with pytest.raises(RewriteError) as raised:
        tf_lora.rewrite.fold(src, tmp_path / "out", adapter="lora_z")
    assert str(raised.value) == f"fold: nothing written; {message}"
    code, stdout, err = _run(capsys, "fold", src, tmp_path / "out", "--adapter", "lora_z")
    assert (code, stdout, err) == (2, "", f"tf-lora fold: nothing written; {message}\n")
    assert sorted(os.listdir(tmp_path)) == ["model"]
    # One that matches still folds it and drops the other.
    code, stdout, _ = _run(capsys, "fold", src, tmp_path / "out", "--adapter", "chat", "--json", "--quiet")
    assert code == 0
    assert sorted((f["adapter"], f["folded"]) for f in json.loads(stdout)["folds"]) == [
        ("chat_a", True),
        ("sql_a", False),
    ]


@pytest.mark.parametrize(
    "argv",
    [
        ["fold", "--adapter", "("],
        ["inject", "--target", "[", "--rank", "1", "--alpha", "1"],
        ["replace-embedding", "--target", "*"],
    ],
)
def test_bad_regex_is_a_usage_error(tmp_path, capsys, argv):
    with pytest.raises(SystemExit) as done:
        cli.main([argv[0], str(tmp_path / "model"), str(tmp_path / "out"), *argv[1:]])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert f"tf-lora {argv[0]}: error: argument " in err and "not a regular expression" in err
    assert not os.path.lexists(tmp_path / "out")


# -- OUT that cannot be created ------------------------------------------------------------------------------


def test_out_that_cannot_be_created_is_a_one_line_error(tmp_path, capsys):
    src = _save(Adapted(), tmp_path / "model")
    (tmp_path / "a_file").write_text("x")
    for out in (tmp_path / "a_file" / "out", tmp_path / "a_file" / "sub" / "out"):
        with pytest.raises(RewriteError, match=f"cannot be created, {tmp_path / 'a_file'} is not a dir"):
            tf_lora.rewrite.fold(src, out)
        for command in (["fold"], ["inject", "--target", "w2", "--rank", "1", "--alpha", "1"]):
            code, stdout, err = _run(capsys, command[0], src, out, *command[1:], "--quiet")
            assert code == 2 and stdout == ""
            assert err == (
                f"tf-lora {command[0]}: {out}: cannot be created, {tmp_path / 'a_file'} is not a directory\n"
            )
    # A name the file system refuses: the error names OUT, not a staging path beside it.
    long_name = tmp_path / ("x" * 300)
    code, stdout, err = _run(capsys, "fold", src, long_name, "--quiet")
    assert code == 2 and stdout == "" and err.count("\n") == 1
    assert err == f"tf-lora fold: {long_name}: File name too long\n"
    assert sorted(os.listdir(tmp_path)) == ["a_file", "model"]


# -- --json on every command ---------------------------------------------------------------------------------


def test_json_reports_of_every_command(tmp_path, capsys):
    src = _save(Adapted(), tmp_path / "model")

    code, stdout, _ = _run(capsys, "inspect", src, "--json")
    info = json.loads(stdout)
    assert code == 0 and (info["command"], info["ok"]) == ("inspect", True)
    assert [(a["adapter"], a["weight"], a["rank"], a["scale"]) for a in info["adapters"]] == [
        ("a1", "w1", 2, 0.5)
    ]

    code, stdout, err = _run(capsys, "fold", src, tmp_path / "folded", "--json", "--verify", "--quiet")
    report = json.loads(stdout)
    assert code == 0 and err == ""
    assert {k: report[k] for k in ("command", "ok", "model", "out")} == {
        "command": "fold",
        "ok": True,
        "model": src,
        "out": str(tmp_path / "folded"),
    }
    [entry] = report["folds"]
    assert {k: entry[k] for k in ("weight", "adapter", "rank", "scale", "folded")} == {
        "weight": "w1",
        "adapter": "a1",
        "rank": 2,
        "scale": 0.5,
        "folded": True,
    }
    assert entry["node"].endswith("LoraApply") and entry["function"].startswith("__inference")
    assert report["weights"] == {"w1": 1}
    assert report["verify"]["tolerance"] == 1e-4
    assert list(report["verify"]["max_difference"]) == ["serving_default"]
    assert 0 <= report["verify"]["max_difference"]["serving_default"] < 1e-5

    code, stdout, _ = _run(
        capsys,
        "inject",
        tmp_path / "folded",
        tmp_path / "injected",
        "--target",
        "w2",
        "--rank",
        "3",
        "--alpha",
        "6",
        "--json",
        "--quiet",
    )
    report = json.loads(stdout)
    assert code == 0 and (report["command"], report["ok"], report["verify"]) == ("inject", True, None)
    [entry] = report["injected"]
    assert {k: entry[k] for k in ("weight", "a", "b", "shape")} == {
        "weight": "w2",
        "a": "w2/lora_a",
        "b": "w2/lora_b",
        "shape": [5, 4],
    }
    assert len(entry["matmuls"]) == 1 and entry["matmuls"][0].startswith("__inference")

    lookup = _save(Lookup(), tmp_path / "lookup")
    code, stdout, _ = _run(
        capsys, "replace-embedding", lookup, tmp_path / "table", "--target", "user_emb", "--json", "--verify"
    )
    report = json.loads(stdout)
    assert code == 0 and report["command"] == "replace-embedding"
    assert [(r["variable"], r["shape"], r["table"], len(r["lookups"])) for r in report["replaced"]] == [
        ("user_emb", [10, 4], "tf_lora_table_user_emb", 1)
    ]
    assert report["verify"]["max_difference"] == {"serving_default": 0.0}


def test_json_report_of_swap_adapter(tmp_path, capsys):
    fixture = pathlib.Path(__file__).parent.parent / "adapters" / "fixtures" / "peft_f32"
    keras.utils.set_random_seed(0)
    inp = keras.Input((8,))
    sizes = (("q", 6, 2), ("v", 6, 3), ("out", 4, 2))  # the fixture's layers: units, rank
    layers = {n: tf_lora.layers.LoraDense(u, rank=r, name=n) for n, u, r in sizes}
    model = keras.Model(inp, layers["out"](keras.layers.ReLU()(layers["q"](inp) + layers["v"](inp))))
    model.export(tmp_path / "model", verbose=False)
    code, stdout, err = _run(
        capsys,
        "swap-adapter",
        tmp_path / "model",
        tmp_path / "out",
        "--adapter",
        fixture,
        "--json",
        "--verify",
        "--quiet",
    )
    report = json.loads(stdout)
    assert code == 0 and err == ""
    assert (report["command"], report["ok"], report["adapter"]) == ("swap-adapter", True, str(fixture))
    assert report["swapped"] == {"out": "out", "q": "q", "v": "v"}
    assert report["unmatched_modules"] == [] and report["layers_without_adapter"] == []
    assert report["verify"]["tolerance"] is None  # swap-adapter changes the outputs on purpose
    assert report["verify"]["max_difference"]["serve"] > 0


# -- no doubled prefixes; stdout for results, stderr for the rest --------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["inject", "--target", "x", "--rank", "1", "--alpha", "1"], "no MatMul weight matches 'x'"),
        (["replace-embedding", "--target", "nothing"], "no embedding lookup matches 'nothing'"),
        (["fold", "--adapter", "nothing"], "nothing written; --adapter 'nothing' matches no adapter"),
        (["inject", "--target", "w2", "--rank", "0", "--alpha", "1"], "rank must be >= 1, got 0"),
    ],
)
def test_errors_name_the_command_once(tmp_path, capsys, argv, message):
    src = _save(Adapted(), tmp_path / "model")
    code, stdout, err = _run(capsys, argv[0], src, tmp_path / "out", *argv[1:])
    assert code == 2 and stdout == ""
    assert err.startswith(f"tf-lora {argv[0]}: {message}") and err.count("\n") == 1
    assert f"{argv[0]}: {argv[0]}:" not in err


def test_results_on_stdout_and_diagnostics_on_stderr(tmp_path, capsys):
    src = _save(Adapted(), tmp_path / "model")
    code, stdout, err = _run(capsys, "fold", src, tmp_path / "out", "--verify")
    assert code == 0
    lines = stdout.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("a1 (rank 2, scale 0.5) folded into w1  [__inference")
    assert lines[1].startswith("verify serving_default: max |difference| = ")
    assert lines[2] == f"wrote {tmp_path / 'out'}"
    assert "folded into" not in err and "wrote" not in err and "verify serving_default" not in err
    code, stdout, err = _run(capsys, "fold", src, tmp_path / "out", "--quiet")  # exists: an error
    assert code == 2 and stdout == ""
    exists = f"tf-lora fold: {tmp_path / 'out'} exists (pass --overwrite / overwrite=True to replace it)\n"
    assert err == exists


# -- inject on a weight that already has an adapter ----------------------------------------------------------


def test_inject_refuses_a_weight_that_already_has_an_adapter(tmp_path, capsys):
    src = _save(Adapted(), tmp_path / "model")
    for target in ("w1", "w.*"):
        code, stdout, err = _run(
            capsys, "inject", src, tmp_path / "out", "--target", target, "--rank", "2", "--alpha", "2"
        )
        assert code == 2 and stdout == ""
        assert err == (
            f"tf-lora inject: nothing written; --target '{target}' matches weights that already have a LoRA "
            "adapter: w1 (adapter a1); leave them out of --target, or fold the model first\n"
        )
        assert sorted(os.listdir(tmp_path)) == ["model"]
    argv = ["inject", src, tmp_path / "out", "--target", "w2", "--rank", "2", "--alpha", "2", "--quiet"]
    code, stdout, _ = _run(capsys, *argv)
    assert code == 0 and stdout.startswith("w2 [5, 4]: new adapter w2/lora_a, w2/lora_b on ")
    with pytest.raises(SystemExit):
        cli.main(["inject", "--help"])
    assert "already has a LoRA adapter is an error (exit 2, nothing written)" in " ".join(
        capsys.readouterr().out.split()
    )


# -- TensorFlow's own logs -----------------------------------------------------------------------------------


# Loads cli.py on its own, as an entry point outside the tf_lora package would run it: nothing has imported
# TensorFlow yet, so what main() does before importing it decides what TensorFlow prints.
def _command(args, level=None):
    """Runs the installed `tf-lora` console script, as users do, without the suite's TF_CPP_MIN_LOG_LEVEL."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    if level is not None:
        env["TF_CPP_MIN_LOG_LEVEL"] = level
    script = pathlib.Path(sys.executable).parent / "tf-lora"
    return subprocess.run(
        [str(script), *map(str, args)], env=env, capture_output=True, text=True, timeout=300
    )


def test_tensorflow_start_up_logs_are_silenced_unless_verbose(tmp_path):
    # "oneDNN custom operations are on", "Could not find cuda drivers": TensorFlow's start-up lines, which
    # TF_CPP_MIN_LOG_LEVEL does not reach, filled the command's stderr.
    src = _save(Adapted(), tmp_path / "model")
    done = _command(["fold", src, tmp_path / "out", "--verify", "--quiet"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr == ""
    assert f"wrote {tmp_path / 'out'}" in done.stdout
    done = _command(["inspect", src, "--verbose"])  # TensorFlow's logging left alone
    assert done.returncode == 0 and "oneDNN custom operations" in done.stderr, done.stderr[-3000:]
    done = _command(["inspect", src], level="0")  # the user's choice is kept
    assert done.returncode == 0 and "oneDNN custom operations" in done.stderr, done.stderr[-3000:]
    assert "Signatures" in done.stdout or done.stdout.strip(), done.stdout
