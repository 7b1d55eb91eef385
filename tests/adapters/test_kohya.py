"""tf_lora.adapters.load_kohya / save_kohya.

No kohya writer installs offline (sd-scripts is not a package), so the kohya file here is the real PEFT
fixture's adapter written under kohya's naming (lora_down = lora_A, lora_up = lora_B, alpha scalars); the
tests check that reading it gives PEFT's own merged weights.
"""

import pathlib

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
