"""tf_lora.adapters.apply: PEFT adapters onto a Keras model: attach == merge == PEFT's own output."""

import pathlib

import keras
import numpy as np
import pytest
from safetensors.tensorflow import load_file

import tf_lora

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "peft_f32"
RANKS = {"q": 2, "v": 3, "out": 2}


def _tiny(lora, prefix=""):
    """PEFT's fixture model in Keras: out(relu(q(x) + v(x))), base weights from the fixture."""
    base = {k: v.numpy() for k, v in load_file(str(FIXTURES / "base.safetensors")).items()}

    def dense(name, units):
        if lora:
            return tf_lora.layers.LoraDense(units, rank=RANKS[name], name=prefix + name)
        return keras.layers.Dense(units, name=prefix + name)

    inp = keras.Input((8,))
    q, v, out = dense("q", 6), dense("v", 6), dense("out", 4)
    model = keras.Model(inp, out(keras.layers.ReLU()(q(inp) + v(inp))))
    for name, layer in (("q", q), ("v", v), ("out", out)):
        layer.kernel.assign(base[f"{name}.weight"].T)
        layer.bias.assign(base[f"{name}.bias"])
    return model


def _io():
    return {k: v.numpy() for k, v in load_file(str(FIXTURES / "io.safetensors")).items()}


@pytest.mark.parametrize("mode,lora", [("attach", True), ("attach", False), ("merge", False)])
def test_attach_and_merge_give_peft_output(mode, lora):
    """attach onto LoraDense layers, attach onto plain Dense layers (converted in place, sized from the
    file), merge into plain Dense kernels: each gives PEFT's output."""
    model = _tiny(lora=lora)
    model.predict(_io()["x"], verbose=0)  # traced before the adapters arrive
    report = tf_lora.adapters.apply(model, tf_lora.adapters.load_peft(FIXTURES), mode=mode)
    assert report.applied == {"out": "out", "q": "q", "v": "v"} and not report.unmatched_modules
    kind = tf_lora.layers.LoraDense if mode == "attach" else keras.layers.Dense
    assert all(type(model.get_layer(n)) is kind for n in ("q", "v", "out"))
    np.testing.assert_allclose(model.predict(_io()["x"], verbose=0), _io()["y"], rtol=1e-5, atol=1e-5)


def test_mapping_and_report():
    model = _tiny(lora=True, prefix="block0_")
    adapters = tf_lora.adapters.load_peft(FIXTURES)
    adapters["lm_head"] = adapters["out"]
    with pytest.raises(ValueError, match=r"modules that match no layer: \['lm_head'\]"):
        tf_lora.adapters.apply(model, adapters, mapping=[(r"(q|v|out)", r"block0_\1")])
    report = tf_lora.adapters.apply(model, adapters, mapping=[(r"(q|v|out)", r"block0_\1")], strict=False)
    assert report.unmatched_modules == ["lm_head"]
    np.testing.assert_allclose(model.predict(_io()["x"], verbose=0), _io()["y"], rtol=1e-5, atol=1e-5)


def test_any_mismatch_changes_nothing_and_lists_every_one():
    model = _tiny(lora=True)
    before = [w.numpy() for w in model.weights]
    adapters = tf_lora.adapters.load_peft(FIXTURES)
    adapters["q"] = tf_lora.adapters.Adapter(
        a=np.ones((8, 3), np.float32), b=np.ones((3, 6), np.float32), alpha=1
    )
    adapters["v"] = tf_lora.adapters.Adapter(
        a=np.ones((5, 3), np.float32), b=np.ones((3, 6), np.float32), alpha=1
    )
    with pytest.raises(ValueError) as info:
        tf_lora.adapters.apply(model, adapters)
    message = str(info.value)
    assert "nothing changed" in message
    assert "q -> q: adapter rank 3, layer adapter 'default' rank 2" in message
    assert "v -> v: adapter is [5, 6], the layer's weight as [in, out] is [8, 6]" in message
    for w, value in zip(model.weights, before, strict=True):
        np.testing.assert_array_equal(w.numpy(), value)
    plain = _tiny(lora=False)
    relu = next(layer.name for layer in plain.layers if isinstance(layer, keras.layers.ReLU))
    with pytest.raises(
        ValueError, match=rf"relu -> {relu}: a ReLU, not a Dense, EinsumDense or Embedding layer"
    ):
        tf_lora.adapters.apply(plain, {"relu": adapters["q"]}, mapping=lambda m: relu)


def test_named_adapters_from_two_files_serve_side_by_side():
    """Two adapter files on one model as named adapters "a" (the PEFT fixture) and "b" (rank 4, its own
    weights): each active in turn, and both at once through per-example ids, against numpy."""
    model = _tiny(lora=True)
    first = tf_lora.adapters.load_peft(FIXTURES)
    rng = np.random.default_rng(7)
    second = {
        m: tf_lora.adapters.Adapter(
            rng.standard_normal((ad.a.shape[0], 4)).astype(np.float32),
            rng.standard_normal((4, ad.b.shape[1])).astype(np.float32),
            alpha=2.0,
            module=m,
        )
        for m, ad in first.items()
    }
    tf_lora.adapters.apply(model, first, adapter_name="a")
    tf_lora.adapters.apply(model, second, adapter_name="b")
    base = {k: v.numpy() for k, v in load_file(str(FIXTURES / "base.safetensors")).items()}

    def reference(x, adapters):
        def dense(name, h):
            w = base[f"{name}.weight"].T + (adapters[name].scale * adapters[name].a @ adapters[name].b)
            return h @ w + base[f"{name}.bias"]

        return dense("out", np.maximum(dense("q", x) + dense("v", x), 0))

    x = _io()["x"]
    layers = [model.get_layer(n) for n in ("q", "v", "out")]
    assert all(layer.adapter_names == ["default", "a", "b"] for layer in layers)
    for name, adapters in (("a", first), ("b", second)):
        for layer in layers:
            layer.set_active_adapter(name)
        np.testing.assert_allclose(model.predict(x, verbose=0), reference(x, adapters), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        reference(x, first), _io()["y"], rtol=1e-5, atol=1e-5
    )  # the reference is PEFT's

    ids = np.arange(len(x)) % 2 + 1  # rows alternate between a (1) and b (2)
    h = layers[0](x, adapter_ids=ids) + layers[1](x, adapter_ids=ids)
    mixed = layers[2](np.maximum(h, 0), adapter_ids=ids).numpy()
    for row, i in enumerate(ids):
        want = reference(x[row : row + 1], first if i == 1 else second)[0]
        np.testing.assert_allclose(mixed[row], want, rtol=1e-5, atol=1e-5)

    wrong_rank = {
        m: tf_lora.adapters.Adapter(ad.a[:, :1], ad.b[:1], 1.0, module=m) for m, ad in first.items()
    }
    before = [w.numpy() for w in model.weights]
    with pytest.raises(ValueError, match="nothing changed;.*adapter rank 1, layer adapter 'b' rank 4"):
        tf_lora.adapters.apply(model, wrong_rank, adapter_name="b")
    with pytest.raises(ValueError, match="adapter_name must be letters, digits or _"):
        tf_lora.adapters.apply(model, first, adapter_name="x y")
    for w, value in zip(model.weights, before, strict=True):
        np.testing.assert_array_equal(w.numpy(), value)


def test_from_model_save_peft_load_peft_round_trip(tmp_path):
    """A model's adapters out through from_model and save_peft, back through load_peft and apply(merge) onto
    the plain Dense model: bit-exact adapters, the same outputs."""
    model = _tiny(lora=True)
    tf_lora.adapters.apply(model, tf_lora.adapters.load_peft(FIXTURES))
    exported = tf_lora.adapters.from_model(model, mapping=lambda name: f"model.{name}")
    assert sorted(exported) == ["model.out", "model.q", "model.v"]
    tf_lora.adapters.save_peft(exported, tmp_path / "peft")
    loaded = tf_lora.adapters.load_peft(tmp_path / "peft")
    for module, adapter in exported.items():
        np.testing.assert_array_equal(loaded[module].a, adapter.a)
        np.testing.assert_array_equal(loaded[module].b, adapter.b)
        assert loaded[module].scale == adapter.scale
    plain = _tiny(lora=False)
    tf_lora.adapters.apply(plain, loaded, mode="merge", mapping=[(r"model\.(\w+)", r"\1")])
    x = _io()["x"]
    np.testing.assert_allclose(plain.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no LoRA layer of the model has an adapter 'nope'"):
        tf_lora.adapters.from_model(model, adapter_name="nope")
