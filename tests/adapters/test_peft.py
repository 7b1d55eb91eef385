"""tf_lora.adapters.load_peft / save_peft against adapters written by the real PEFT library.

The fixtures (tests/adapters/make_peft_fixtures.py) hold PEFT's own files for a tiny model with LoRA on three
Linear layers (rank_pattern, alpha_pattern, float32 / rsLoRA float16 / bfloat16), the base weights, PEFT's
merged weights (merge_and_unload) and an input with PEFT's output for it.
"""

import hashlib
import json
import math
import pathlib
import shutil

import numpy as np
import pytest
import tensorflow as tf
from safetensors.numpy import save_file as save_numpy
from safetensors.tensorflow import load_file, save_file

import tf_lora

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
CASES = {"peft_f32": 1e-6, "peft_rslora_f16": 3e-3, "peft_bf16": 3e-2}


def _tensors(name, file):
    return {k: v.numpy().astype(np.float32) for k, v in load_file(str(FIXTURES / name / file)).items()}


@pytest.mark.parametrize("name", CASES)
def test_merge_matches_peft_merge_and_unload(name):
    adapters = tf_lora.adapters.load_peft(FIXTURES / name)
    assert set(adapters) == {"q", "v", "out"}
    assert (adapters["q"].rank, adapters["v"].rank, adapters["out"].rank) == (2, 3, 2)  # rank_pattern v: 3
    assert (adapters["q"].alpha, adapters["v"].alpha, adapters["out"].alpha) == (
        4,
        4,
        8,
    )  # alpha_pattern out: 8
    rslora = name == "peft_rslora_f16"
    assert adapters["q"].scale == pytest.approx(4 / math.sqrt(2) if rslora else 2.0)
    base, merged = _tensors(name, "base.safetensors"), _tensors(name, "merged.safetensors")
    for module, adapter in adapters.items():
        ours = tf_lora.lora_merge(
            base[f"{module}.weight"].T,
            adapter.a.astype(np.float32),
            adapter.b.astype(np.float32),
            adapter.scale,
        )
        np.testing.assert_allclose(ours, merged[f"{module}.weight"].T, atol=CASES[name], rtol=CASES[name])


def test_pattern_keys_with_alternatives_match_as_peft_matches_them():
    # PEFT's pattern key `q|v` is `(.*\.)?(q|v)$`: ungrouped, only q took the prefix, so block.v kept r = 2
    # against its rank-3 weights (the file was refused) and `v|out` gave block.out the default alpha
    # (silently wrong).
    name = "peft_regex_patterns"
    adapters = tf_lora.adapters.load_peft(FIXTURES / name)
    want = {"block.q": (3, 4), "block.v": (3, 8), "block.out": (2, 8)}
    assert {m: (a.rank, a.alpha) for m, a in adapters.items()} == want
    base, merged = _tensors(name, "base.safetensors"), _tensors(name, "merged.safetensors")
    for module, adapter in adapters.items():
        ours = tf_lora.lora_merge(base[f"{module}.weight"].T, adapter.a, adapter.b, adapter.scale)
        np.testing.assert_allclose(ours, merged[f"{module}.weight"].T, atol=1e-6, rtol=1e-6)


def test_forward_matches_peft():
    """The tiny model with its adapters through tf_lora.lora_matmul gives PEFT's output."""
    adapters = tf_lora.adapters.load_peft(FIXTURES / "peft_f32")
    w, io = _tensors("peft_f32", "base.safetensors"), _tensors("peft_f32", "io.safetensors")

    def layer(x, module):
        ad = adapters[module]
        return tf_lora.lora_matmul(x, w[f"{module}.weight"].T, ad.a, ad.b, ad.scale, bias=w[f"{module}.bias"])

    x = tf.constant(io["x"])
    y = layer(tf.nn.relu(layer(x, "q") + layer(x, "v")), "out")
    np.testing.assert_allclose(y, io["y"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", CASES)
def test_save_load_round_trip_is_exact(name, tmp_path):
    adapters = tf_lora.adapters.load_peft(FIXTURES / name)
    tf_lora.adapters.save_peft(adapters, tmp_path / "out")
    again = tf_lora.adapters.load_peft(tmp_path / "out")
    assert set(again) == set(adapters)
    for module, adapter in adapters.items():
        assert again[module].a.dtype == adapter.a.dtype
        np.testing.assert_array_equal(again[module].a, adapter.a)
        np.testing.assert_array_equal(again[module].b, adapter.b)
        assert (again[module].alpha, again[module].rank, again[module].use_rslora) == (
            adapter.alpha,
            adapter.rank,
            adapter.use_rslora,
        )


def test_save_refuses_an_existing_directory(tmp_path):
    adapters = tf_lora.adapters.load_peft(FIXTURES / "peft_f32")
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists"):
        tf_lora.adapters.save_peft(adapters, target)
    assert (target / "keep.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging directory left behind


# ---- Bad input: clear errors ----


def _copy(tmp_path, name="peft_f32"):
    path = tmp_path / name
    shutil.copytree(FIXTURES / name, path)
    return path


def test_truncated_or_corrupted_file(tmp_path):
    path = _copy(tmp_path)
    weights = path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        tf_lora.adapters.load_peft(path)
    # A header that claims more bytes than the file has (offsets out of range).
    weights.write_bytes((10**9).to_bytes(8, "little") + data[8:])
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        tf_lora.adapters.load_peft(path)


def test_missing_or_inconsistent_config(tmp_path):
    path = _copy(tmp_path)
    config = json.loads((path / "adapter_config.json").read_text())
    del config["r"]
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"missing or non-numeric \['r'\]"):
        tf_lora.adapters.load_peft(path)
    config["r"] = 3  # the weights say 2 for q and out
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="q: rank 2 in the weights, 3 in the config"):
        tf_lora.adapters.load_peft(path)
    (path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        tf_lora.adapters.load_peft(path)
    with pytest.raises(ValueError, match="no adapter_config.json"):
        tf_lora.adapters.load_peft(tmp_path)


def _rewrite(path, change):
    tensors = {k: v for k, v in load_file(str(path / "adapter_model.safetensors")).items()}
    change(tensors)
    save_file(tensors, str(path / "adapter_model.safetensors"))


def test_rank_mismatch_between_a_and_b(tmp_path):
    path = _copy(tmp_path)
    _rewrite(path, lambda t: t.update({"base_model.model.q.lora_B.weight": tf.zeros([6, 3])}))
    with pytest.raises(ValueError, match=r"q: lora_A \(2, 8\) and lora_B \(6, 3\)"):
        tf_lora.adapters.load_peft(path)


def test_non_finite_weights_refused_unless_allowed(tmp_path):
    path = _copy(tmp_path)
    _rewrite(path, lambda t: t.update({"base_model.model.v.lora_A.weight": tf.fill([3, 8], np.nan)}))
    with pytest.raises(ValueError, match="v: NaN or Inf weights"):
        tf_lora.adapters.load_peft(path)
    assert np.isnan(tf_lora.adapters.load_peft(path, allow_nonfinite=True)["v"].a).all()


def test_sha256(tmp_path):
    path = FIXTURES / "peft_f32"
    digest = hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert set(tf_lora.adapters.load_peft(path, sha256=digest)) == {"q", "v", "out"}
    with pytest.raises(ValueError, match="has SHA-256"):
        tf_lora.adapters.load_peft(path, sha256="0" * 64)


def test_unknown_keys(tmp_path):
    path = _copy(tmp_path)
    _rewrite(path, lambda t: t.update({"base_model.model.q.lora_E": tf.zeros([6])}))
    with pytest.raises(ValueError, match="'base_model.model.q.lora_E' is not a LoRA A or B weight"):
        tf_lora.adapters.load_peft(path)
    path = _copy(tmp_path / "2")
    _rewrite(path, lambda t: t.update({"base_model.model.q.lora_magnitude_vector": tf.zeros([6])}))
    with pytest.raises(ValueError, match="lora_magnitude_vector weights \\(DoRA\\) but use_dora is not true"):
        tf_lora.adapters.load_peft(path)
    path = _copy(tmp_path / "3")
    _rewrite(path, lambda t: t.update({"base_model.model.head.weight": tf.zeros([6, 2])}))
    with pytest.raises(ValueError, match="whole weight of 'head', which the config neither saves"):
        tf_lora.adapters.load_peft(path)


@pytest.mark.parametrize(
    "peft_type,kind", [("LOHA", "LoHa"), ("LOKR", "LoKr"), ("IA3", "IA3"), ("VERA", "VeRA")]
)
def test_other_peft_adapter_kinds_are_named(tmp_path, peft_type, kind):
    path = _copy(tmp_path)
    _write_config(path, peft_type=peft_type)
    with pytest.raises(
        ValueError, match=f"a {kind} adapter \\(peft_type '{peft_type}'\\); tf_lora reads LoRA"
    ):
        tf_lora.adapters.load_peft(path)


def test_the_weights_file_or_the_config_file_stands_for_its_directory(tmp_path):
    # Passing adapter_model.safetensors used to fail with NotADirectoryError (".../adapter_model.safetensors/
    # adapter_config.json").
    path = _copy(tmp_path)
    want = tf_lora.adapters.load_peft(path)
    for file in ("adapter_model.safetensors", "adapter_config.json"):
        got = tf_lora.adapters.load_peft(path / file)
        assert sorted(got) == sorted(want)
        for module, adapter in want.items():
            np.testing.assert_array_equal(got[module].a, adapter.a)
            np.testing.assert_array_equal(got[module].b, adapter.b)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file; pass the directory PEFT's save_pretrained wrote"):
        tf_lora.adapters.load_peft(other)


def _write_config(path, **changes):
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def test_target_modules_that_match_no_weight_are_an_error(tmp_path):
    # Such a config (from another model's fine-tune) loaded silently as plain LoRA.
    path = _copy(tmp_path)
    for targets in (["k_proj", "v_proj"], "model\\..*\\.q_proj"):
        _write_config(path, target_modules=targets)
        with pytest.raises(ValueError, match="match none of the adapted modules"):
            tf_lora.adapters.load_peft(path)
    for targets in (["q"], "q|out|v", "all-linear", None):  # PEFT's ways of naming these modules
        _write_config(path, target_modules=targets)
        assert sorted(tf_lora.adapters.load_peft(path)) == ["out", "q", "v"]


def test_dora_without_its_magnitudes_is_an_error_not_plain_lora(tmp_path):
    path = _copy(tmp_path)
    _write_config(path, use_dora=True)
    with pytest.raises(ValueError, match="DoRA adapter .*without the lora_magnitude_vector"):
        tf_lora.adapters.load_peft(path)
    tensors = {k: v.numpy() for k, v in load_file(str(path / "adapter_model.safetensors")).items()}
    tensors["base_model.model.q.lora_magnitude_vector"] = np.ones([6], np.float32)
    save_numpy(tensors, str(path / "adapter_model.safetensors"))
    with pytest.raises(
        ValueError, match=r"without the lora_magnitude_vector weights DoRA needs for \['out', 'v'\]"
    ):
        tf_lora.adapters.load_peft(path)


def test_rank_zero_is_an_error(tmp_path):
    # A rank-0 adapter loaded, then divided by zero computing its scale.
    path = _copy(tmp_path)
    _write_config(path, r=0)
    with pytest.raises(ValueError, match="r must be an integer >= 1, got 0"):
        tf_lora.adapters.load_peft(path)
    for bad in (True, float("inf")):  # was accepted as rank 1 / an OverflowError
        _write_config(path, r=bad)
        with pytest.raises(ValueError, match="r must be an integer >= 1"):
            tf_lora.adapters.load_peft(path)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        tf_lora.adapters.Adapter(a=np.zeros([4, 0], np.float32), b=np.zeros([0, 3], np.float32), alpha=8.0)
    with pytest.raises(ValueError, match="alpha must be finite"):
        tf_lora.adapters.Adapter(
            a=np.zeros([4, 1], np.float32), b=np.zeros([1, 3], np.float32), alpha=math.nan
        )
