"""The examples run end to end against the installed wheel and report PASS (`make demo` runs the first)."""

import os
import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"


def _run(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_digits_lora_main_example(tmp_path):
    out = _run(str(EXAMPLES / "digits_lora.py"), "--out", str(tmp_path))
    assert "PASS" in out
    assert sorted(os.listdir(tmp_path / "digits-peft")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def test_keras_hub_example(tmp_path):
    pytest.importorskip("keras_hub")
    out = _run(str(EXAMPLES / "keras_hub_lora.py"), "--out", str(tmp_path))
    assert "PASS" in out
    assert sorted(os.listdir(tmp_path / "gpt2-peft")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert "transformer.h.0.attn.c_attn" in (tmp_path / "gpt2-peft" / "adapter_config.json").read_text()


@pytest.mark.parametrize("example", ["merge_adapter.py"])
def test_small_examples(example):
    assert "PASS" in _run(str(EXAMPLES / example))
