"""The whole PEFT LoRA file format against files and outputs made by PEFT itself
(tests/adapters/make_peft_fixtures.py): DoRA, trained biases (`bias="lora_only"`, `"all"`) and
`modules_to_save`: loaded, applied (attach and merge), trained, saved back."""

import json
import pathlib

import keras
import numpy as np
import pytest
from safetensors.numpy import load_file

import tf_lora

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def _tiny(fixture, lora=False):
    """PEFT's fixture model in Keras: out(relu(q(x) + v(x))), base weights from the fixture."""
    base = load_file(str(FIXTURES / fixture / "base.safetensors"))
    inp = keras.Input((8,))
    make = (lambda units, name: tf_lora.layers.LoraDense(units, name=name)) if lora else keras.layers.Dense
    q, v, out = make(6, name="q"), make(6, name="v"), make(4, name="out")
    model = keras.Model(inp, out(keras.layers.ReLU()(q(inp) + v(inp))))
    for name, layer in (("q", q), ("v", v), ("out", out)):
        layer.kernel.assign(base[f"{name}.weight"].T)
        layer.bias.assign(base[f"{name}.bias"])
    return model


def _io(fixture):
    return load_file(str(FIXTURES / fixture / "io.safetensors"))


FIXTURE_NAMES = ["peft_dora", "peft_lora_only_bias", "peft_all_bias"]


@pytest.mark.parametrize("mode", ["attach", "merge"])
@pytest.mark.parametrize("fixture", FIXTURE_NAMES)
def test_apply_gives_peft_output(fixture, mode):
    model = _tiny(fixture)
    adapters = tf_lora.adapters.load_peft(FIXTURES / fixture)
    report = tf_lora.adapters.apply(model, adapters, mode=mode)
    io = _io(fixture)
    np.testing.assert_allclose(model(io["x"]).numpy(), io["y"], rtol=1e-5, atol=1e-5)
    if mode == "merge":  # the weights PEFT's merge_and_unload gives
        merged = load_file(str(FIXTURES / fixture / "merged.safetensors"))
        for name in ("q", "v", "out"):
            layer = model.get_layer(name)
            np.testing.assert_allclose(layer.kernel.numpy(), merged[f"{name}.weight"].T, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(layer.bias.numpy(), merged[f"{name}.bias"], rtol=1e-6, atol=1e-7)
    if fixture == "peft_lora_only_bias":
        assert report.replaced == {"v": "v"} and sorted(report.applied) == ["out", "q"]


def test_dora_loads_its_magnitudes_and_merges_unmerges_in_the_layer():
    adapters = tf_lora.adapters.load_peft(FIXTURES / "peft_dora")
    assert all(a.use_dora and a.magnitude.shape == (a.b.shape[1],) for a in adapters.values())
    model = _tiny("peft_dora")
    tf_lora.adapters.apply(model, adapters)
    layer = model.get_layer("v")
    assert type(layer) is tf_lora.layers.LoraDense and layer.use_dora
    io = _io("peft_dora")
    kernel = layer.kernel.numpy()
    tf_lora.layers.merge(model)
    np.testing.assert_allclose(model(io["x"]).numpy(), io["y"], rtol=1e-5, atol=1e-5)
    merged = load_file(str(FIXTURES / "peft_dora" / "merged.safetensors"))
    np.testing.assert_allclose(layer.kernel.numpy(), merged["v.weight"].T, rtol=1e-5, atol=1e-6)
    tf_lora.layers.unmerge(model)
    np.testing.assert_allclose(layer.kernel.numpy(), kernel, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model(io["x"]).numpy(), io["y"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="DoRA adapter 'default' is served alone"):
        layer(io["x"], adapter_ids=[0, 0, 0, 0, 0])


def test_dora_trains_magnitude_and_saves_back_what_peft_wrote(tmp_path):
    model = _tiny("peft_dora")
    tf_lora.adapters.apply(model, tf_lora.adapters.load_peft(FIXTURES / "peft_dora"))
    tf_lora.adapters.save_peft(tf_lora.adapters.from_model(model), tmp_path / "out")
    ours = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    theirs = load_file(str(FIXTURES / "peft_dora" / "adapter_model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        np.testing.assert_allclose(ours[key], value, rtol=1e-6, err_msg=key)
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["use_dora"] is True
    # The magnitude is trained with a and b (and the base stays frozen).
    names = {w.path.rsplit("/", 1)[-1] for w in model.trainable_weights}
    assert names == {"lora_a", "lora_b", "lora_magnitude"}
    io = _io("peft_dora")
    magnitude = model.get_layer("q").adapter_slot().magnitude.numpy()
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    model.fit(io["x"], np.zeros_like(io["y"]), epochs=2, verbose=0)
    assert not np.allclose(model.get_layer("q").adapter_slot().magnitude.numpy(), magnitude)


def test_dora_layer_forward_matches_peft_formula_on_einsum_dense():
    """DoRA on an EinsumDense (Gemma's query layout, kernel [heads, in, head_dim]) against numpy."""
    rng = np.random.default_rng(0)
    layer = tf_lora.layers.LoraEinsumDense("btd,ndh->btnh", (None, 2, 4), rank=3, alpha=6, use_dora=True)
    x = rng.standard_normal((2, 5, 8)).astype(np.float32)
    layer(x)
    slot = layer.adapter_slot()
    slot.b.assign(rng.standard_normal(slot.b.shape).astype(np.float32))
    slot.magnitude.assign(rng.uniform(0.5, 2.0, slot.magnitude.shape).astype(np.float32))
    w = layer.kernel.numpy().transpose(1, 0, 2).reshape(8, 8)  # [in, heads * head_dim]
    adapted = w + 2.0 * slot.a.numpy() @ slot.b.numpy()
    expected = (x.reshape(-1, 8) @ adapted) * (slot.magnitude.numpy() / np.linalg.norm(adapted, axis=0))
    np.testing.assert_allclose(layer(x).numpy().reshape(-1, 8), expected, rtol=1e-5, atol=1e-5)
    layer.merge()
    np.testing.assert_allclose(layer(x).numpy().reshape(-1, 8), expected, rtol=1e-5, atol=1e-5)


def test_biases_and_modules_to_save_save_back_what_peft_wrote(tmp_path):
    model = _tiny("peft_lora_only_bias")
    tf_lora.adapters.apply(model, tf_lora.adapters.load_peft(FIXTURES / "peft_lora_only_bias"))
    exported = tf_lora.adapters.from_model(model, bias="lora_only", modules_to_save=["v"])
    tf_lora.adapters.save_peft(exported, tmp_path / "out")
    ours = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    theirs = load_file(str(FIXTURES / "peft_lora_only_bias" / "adapter_model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        np.testing.assert_allclose(ours[key], value, rtol=1e-6, err_msg=key)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["bias"] == "lora_only" and config["modules_to_save"] == ["v"]
    again = _tiny("peft_lora_only_bias")
    tf_lora.adapters.apply(again, tf_lora.adapters.load_peft(tmp_path / "out"), mode="merge")
    io = _io("peft_lora_only_bias")
    np.testing.assert_allclose(again(io["x"]).numpy(), io["y"], rtol=1e-5, atol=1e-5)


def test_registry_restores_biases_and_replaced_layers_exactly(tmp_path):
    model = _tiny("peft_lora_only_bias")
    before = [w.numpy() for w in model.weights]
    registry = tf_lora.adapters.Registry(tmp_path / "registry", model)
    registry.register("bias", FIXTURES / "peft_lora_only_bias")
    registry.activate("bias")
    io = _io("peft_lora_only_bias")
    np.testing.assert_allclose(model(io["x"]).numpy(), io["y"], rtol=1e-5, atol=1e-5)
    registry.deactivate()
    for w, value in zip(model.weights, before, strict=True):
        np.testing.assert_array_equal(w.numpy(), value)


def test_a_bias_for_a_layer_without_one_changes_nothing():
    inp = keras.Input((8,))
    q, v, out = (
        keras.layers.Dense(u, name=n, use_bias=n != "q") for u, n in ((6, "q"), (6, "v"), (4, "out"))
    )
    model = keras.Model(inp, out(keras.layers.ReLU()(q(inp) + v(inp))))
    before = [w.numpy() for w in model.weights]
    with pytest.raises(ValueError, match="q -> q: the file trains its bias, but the layer has no bias"):
        tf_lora.adapters.apply(model, tf_lora.adapters.load_peft(FIXTURES / "peft_lora_only_bias"))
    for w, value in zip(model.weights, before, strict=True):
        np.testing.assert_array_equal(w.numpy(), value)
