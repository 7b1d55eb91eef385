"""tf_lora.adapters.load_kohya / save_kohya.

Files written by LyCORIS (the network kohya's sd-scripts trains with; fixtures/kohya, made by
make_kohya_fixtures.py) must give LyCORIS's own merged weights and outputs. Other tests write the real PEFT
fixture's adapter under kohya's naming (lora_down = lora_A, lora_up = lora_B, alpha scalars) to reach the
cases LyCORIS does not write (no alpha, alpha 0).
"""

import pathlib

import keras
import numpy as np
import pytest
from safetensors.numpy import save_file
from safetensors.tensorflow import load_file

import tf_lora

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def _kohya_from_peft(path, alphas=True, conv=False):
    peft = {
        k: v.numpy() for k, v in load_file(str(FIXTURES / "peft_f32" / "adapter_model.safetensors")).items()
    }
    tensors = {}
    for module, alpha in (("q", 4.0), ("v", 4.0), ("out", 8.0)):
        down = peft[f"base_model.model.{module}.lora_A.weight"]
        up = peft[f"base_model.model.{module}.lora_B.weight"]
        if conv:
            down, up = down[:, :, None, None], up[:, :, None, None]
        tensors[f"lora_te_{module}.lora_down.weight"] = down
        tensors[f"lora_te_{module}.lora_up.weight"] = up
        if alphas:
            tensors[f"lora_te_{module}.alpha"] = np.array(alpha, np.float16)  # 0-d, as kohya writes it
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "1x1 conv"])
def test_kohya_gives_peft_merged_weights(tmp_path, conv):
    adapters = tf_lora.adapters.load_kohya(_kohya_from_peft(tmp_path / "lora.safetensors", conv=conv))
    assert set(adapters) == {"lora_te_q", "lora_te_v", "lora_te_out"}
    base = {k: v.numpy() for k, v in load_file(str(FIXTURES / "peft_f32" / "base.safetensors")).items()}
    merged = {k: v.numpy() for k, v in load_file(str(FIXTURES / "peft_f32" / "merged.safetensors")).items()}
    for module in ("q", "v", "out"):
        ad = adapters[f"lora_te_{module}"]
        ours = tf_lora.lora_merge(base[f"{module}.weight"].T, ad.a, ad.b, ad.scale)
        np.testing.assert_allclose(ours, merged[f"{module}.weight"].T, atol=1e-6, rtol=1e-6)


def test_missing_alpha_means_rank(tmp_path):
    adapters = tf_lora.adapters.load_kohya(_kohya_from_peft(tmp_path / "lora.safetensors", alphas=False))
    assert all(ad.alpha == ad.rank and ad.scale == 1.0 for ad in adapters.values())


def test_save_load_round_trip(tmp_path):
    adapters = tf_lora.adapters.load_peft(FIXTURES / "peft_rslora_f16")  # rsLoRA: alpha rescaled on save
    tf_lora.adapters.save_kohya(adapters, tmp_path / "lora.safetensors")
    written = load_file(str(tmp_path / "lora.safetensors"))
    assert written["q.alpha"].shape == () and written["q.lora_down.weight"].dtype.name == "float16"
    again = tf_lora.adapters.load_kohya(tmp_path / "lora.safetensors")
    for module, ad in adapters.items():
        np.testing.assert_array_equal(again[module].a, ad.a)
        np.testing.assert_array_equal(again[module].b, ad.b)
        assert again[module].scale == pytest.approx(ad.scale, rel=1e-6)
    with pytest.raises(FileExistsError):
        tf_lora.adapters.save_kohya(adapters, tmp_path / "lora.safetensors")


def test_bad_files(tmp_path):
    path = _kohya_from_peft(tmp_path / "lora.safetensors")
    tensors = {k: np.asarray(v.numpy()) for k, v in load_file(str(path)).items()}
    del tensors["lora_te_q.lora_up.weight"]
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match="lora_te_q: needs both lora_down.weight and lora_up.weight"):
        tf_lora.adapters.load_kohya(path)
    tensors["lora_te_q.lora_up.weight"] = np.zeros([6, 2, 3, 3], np.float32)
    tensors["lora_te_q.lora_down.weight"] = np.zeros([2, 8, 3, 3], np.float32)
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=r"lora_te_q: lora_down \(2, 8, 3, 3\)"):
        tf_lora.adapters.load_kohya(path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        tf_lora.adapters.load_kohya(path)


LYCORIS = FIXTURES / "kohya"


@pytest.mark.parametrize("precision", ["f32", "f16"])
def test_lycoris_file_gives_lycoris_merged_weights(precision):
    """Linear and 1x1 Conv2d modules: lora_merge of the loaded adapters equals LyCORIS's merge_to."""
    adapters = tf_lora.adapters.load_kohya(LYCORIS / f"lycoris_{precision}.safetensors")
    assert sorted(adapters) == ["lora_unet_out", "lora_unet_proj", "lora_unet_q", "lora_unet_v"]
    base = {k: v.numpy() for k, v in load_file(str(LYCORIS / "base.safetensors")).items()}
    merged = {k: v.numpy() for k, v in load_file(str(LYCORIS / "merged.safetensors")).items()}
    tol = 1e-6 if precision == "f32" else 2e-2  # the f16 file rounds LyCORIS's float32 weights
    for module in ("q", "v", "out", "proj"):
        adapter = adapters[f"lora_unet_{module}"]
        assert (adapter.rank, adapter.alpha, adapter.scale) == (4, 2.0, 0.5)
        w = base[f"{module}.weight"].reshape(base[f"{module}.weight"].shape[:2]).T  # [in, out]
        ours = tf_lora.lora_merge(
            w, adapter.a.astype(np.float32), adapter.b.astype(np.float32), adapter.scale
        )
        expected = merged[f"{module}.weight"].reshape(w.shape[::-1]).T
        assert np.abs(expected - w).max() > 0.1  # the adapter is not zero
        np.testing.assert_allclose(ours.numpy(), expected, rtol=tol, atol=tol)


def test_lycoris_file_on_keras_layers_gives_lycoris_output():
    base = {k: v.numpy() for k, v in load_file(str(LYCORIS / "base.safetensors")).items()}
    io = {k: v.numpy() for k, v in load_file(str(LYCORIS / "io.safetensors")).items()}
    inp = keras.Input((8,))
    q, v, out = (
        tf_lora.layers.LoraDense(n, rank=4, name=name) for name, n in (("q", 6), ("v", 6), ("out", 4))
    )
    model = keras.Model(inp, out(keras.layers.ReLU()(q(inp) + v(inp))))
    for name, layer in (("q", q), ("v", v), ("out", out)):
        layer.kernel.assign(base[f"{name}.weight"].T)
        layer.bias.assign(base[f"{name}.bias"])
    report = tf_lora.adapters.apply(
        model,
        tf_lora.adapters.load_kohya(LYCORIS / "lycoris_f32.safetensors"),
        mapping=[(r"lora_unet_(q|v|out)", r"\1")],
        strict=False,
    )
    assert report.unmatched_modules == ["lora_unet_proj"]  # the conv has no Keras layer here
    np.testing.assert_allclose(model.predict(io["x"], verbose=0), io["y"], rtol=1e-5, atol=1e-5)


def test_save_kohya_writes_what_lycoris_writes(tmp_path):
    """Our writer's file holds LyCORIS's keys, shapes (1x1 convs as 2-D) and values."""
    adapters = tf_lora.adapters.load_kohya(LYCORIS / "lycoris_f32.safetensors")
    tf_lora.adapters.save_kohya(adapters, tmp_path / "ours.safetensors")
    theirs = {k: v.numpy() for k, v in load_file(str(LYCORIS / "lycoris_f32.safetensors")).items()}
    ours = {k: v.numpy() for k, v in load_file(str(tmp_path / "ours.safetensors")).items()}
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        np.testing.assert_array_equal(ours[key].reshape(value.shape), value, err_msg=key)


def test_a_directory_holding_one_kohya_file_stands_for_it(tmp_path):
    path = _kohya_from_peft(tmp_path / "lora.safetensors")
    want = tf_lora.adapters.load_kohya(path)
    got = tf_lora.adapters.load_kohya(tmp_path)
    assert sorted(got) == sorted(want)
    for name, adapter in want.items():
        np.testing.assert_array_equal(got[name].a, adapter.a)
    _kohya_from_peft(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match=r"holding 2 \.safetensors files .*pass the kohya LoRA file itself"):
        tf_lora.adapters.load_kohya(tmp_path)
    with pytest.raises(ValueError, match="is a PEFT adapter directory; use load_peft"):
        tf_lora.adapters.load_kohya(FIXTURES / "peft_f32")
