"""tf_lora.rewrite.swap_adapter and `tf-lora swap-adapter`: adapter files into an exported model's applies,
checked against the outputs PEFT and LyCORIS themselves computed."""

import os
import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from safetensors.tensorflow import load_file

import tf_lora
from tf_lora.rewrite import RewriteError, cli

FIXTURES = pathlib.Path(__file__).parent.parent / "adapters" / "fixtures"


def _exported(tmp_path, fixture, ranks, merged=False):
    """The fixture's tiny model out(relu(q(x) + v(x))) in Keras with LoraDense layers (adapters random, not
    the file's), exported as a SavedModel."""
    base = {k: v.numpy() for k, v in load_file(str(fixture / "base.safetensors")).items()}
    keras.utils.set_random_seed(0)
    inp = keras.Input((8,))
    layers = {
        n: tf_lora.layers.LoraDense(u, rank=ranks[n], name=n) for n, u in (("q", 6), ("v", 6), ("out", 4))
    }
    model = keras.Model(inp, layers["out"](keras.layers.ReLU()(layers["q"](inp) + layers["v"](inp))))
    for name, layer in layers.items():
        layer.kernel.assign(base[f"{name}.weight"].T)
        layer.bias.assign(base[f"{name}.bias"])
        layer.lora_b.assign(np.ones(layer.lora_b.shape, np.float32))
        if merged:
            layer.merge()
    model.export(tmp_path / "model", verbose=False)
    return tmp_path / "model"


def _serve(path, x):
    loaded = tf.saved_model.load(path)  # held: its functions need its variables alive
    return loaded.serve(x).numpy()


def _io(fixture):
    return {k: v.numpy() for k, v in load_file(str(fixture / "io.safetensors")).items()}


def test_peft_adapter_gives_peft_output(tmp_path):
    src = _exported(tmp_path, FIXTURES / "peft_f32", {"q": 2, "v": 3, "out": 2})
    io = _io(FIXTURES / "peft_f32")
    before = _serve(str(src), io["x"])
    assert np.abs(before - io["y"]).max() > 0.1  # the model's own adapters are not the file's
    report = tf_lora.rewrite.swap_adapter(src, tmp_path / "swapped", FIXTURES / "peft_f32")
    assert report.swapped == {"out": "out", "q": "q", "v": "v"} and not report.unmatched_modules
    after = _serve(str(tmp_path / "swapped"), io["x"])
    np.testing.assert_allclose(after, io["y"], rtol=1e-5, atol=1e-5)
    # Swapped, then folded: stock TF gives PEFT's output too.
    tf_lora.rewrite.fold(tmp_path / "swapped", tmp_path / "folded")
    folded = _serve(str(tmp_path / "folded"), io["x"])
    np.testing.assert_allclose(folded, io["y"], rtol=1e-5, atol=1e-5)


def test_kohya_file_from_lycoris_through_the_cli(tmp_path, capsys):
    src = _exported(tmp_path, FIXTURES / "kohya", {"q": 4, "v": 4, "out": 4})
    io = _io(FIXTURES / "kohya")
    lycoris = str(FIXTURES / "kohya" / "lycoris_f32.safetensors")
    args = [
        "swap-adapter",
        str(src),
        str(tmp_path / "swapped"),
        "--adapter",
        lycoris,
        "--map",
        r"lora_unet_(\w+)=\1",
    ]
    assert cli.main(args) == 2  # lora_unet_proj (a conv) matches no apply: strict by default
    assert "modules that match no LoRA apply: ['lora_unet_proj']" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "swapped")
    assert cli.main([*args, "--partial", "--verify"]) == 0
    printed = capsys.readouterr()
    assert "lora_unet_q -> q" in printed.out  # results on stdout, the warning on stderr
    assert "warning: modules that matched no LoRA apply: ['lora_unet_proj']" in printed.err
    assert "verify serving_default: max |difference| = " in printed.out
    after = _serve(str(tmp_path / "swapped"), io["x"])
    np.testing.assert_allclose(after, io["y"], rtol=1e-5, atol=1e-5)


def test_mismatches_write_nothing(tmp_path):
    src = _exported(tmp_path, FIXTURES / "peft_f32", {"q": 2, "v": 2, "out": 2})  # v: rank 2, the file's 3
    with pytest.raises(RewriteError, match=r"nothing written; v -> v .*adapter a \[8, 3\], b \[3, 6\]"):
        tf_lora.rewrite.swap_adapter(src, tmp_path / "out", FIXTURES / "peft_f32")
    with pytest.raises(RewriteError, match="has SHA-256 .*, expected 0000"):
        tf_lora.rewrite.swap_adapter(
            src,
            tmp_path / "out",
            tf_lora.rewrite.adapter_swap.load_adapter_file(FIXTURES / "peft_f32", sha256="0" * 64),
        )
    merged = _exported(tmp_path / "m", FIXTURES / "peft_f32", {"q": 2, "v": 3, "out": 2}, merged=True)
    with pytest.raises(RewriteError, match="scale 0, the adapter is merged into q/kernel"):
        tf_lora.rewrite.swap_adapter(merged, tmp_path / "out", FIXTURES / "peft_f32")
    assert not os.path.exists(tmp_path / "out")
