"""A second file loaded by name (apply(..., adapter_name="sql")) onto layers the first did not adapt gives
them the default adapter every LoRA layer has, at zero; exporting the default adapter leaves those out, as
PEFT's model has no default adapter there, so the file that was loaded comes back as it was."""

import keras
import numpy as np

import tf_lora


def _adapter(rng, n_in, n_out, rank, alpha, use_rslora=False):
    return tf_lora.adapters.Adapter(
        rng.standard_normal((n_in, rank)).astype(np.float32),
        rng.standard_normal((rank, n_out)).astype(np.float32),
        alpha=alpha,
        use_rslora=use_rslora,
    )


def test_default_export_skips_the_default_adapters_that_only_hold_their_place(tmp_path):
    rng = np.random.default_rng(0)
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(5, name="d1")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(4, name="d2")(hidden))
    default = {"d1": _adapter(rng, 6, 5, 2, 4.0)}
    sql = {"d1": _adapter(rng, 6, 5, 4, 2.0, True), "d2": _adapter(rng, 5, 4, 4, 2.0, True)}
    tf_lora.adapters.apply(model, default)
    tf_lora.adapters.apply(model, sql, adapter_name="sql")
    assert model.get_layer("d2").adapter_names == ["default", "sql"]  # d2's default holds its place

    exported = tf_lora.adapters.from_model(model, mapping="paths")
    assert sorted(exported) == ["d1"]
    np.testing.assert_array_equal(exported["d1"].b, default["d1"].b)
    tf_lora.adapters.save_peft(exported, tmp_path / "default")  # one use_rslora flag: default's alone
    assert sorted(tf_lora.adapters.load_peft(tmp_path / "default")) == ["d1"]
    assert sorted(tf_lora.adapters.from_model(model, adapter_name="sql", mapping="paths")) == ["d1", "d2"]

    # Once d2's default is in use (active, or set), it is exported like any other.
    model.get_layer("d2").set_active_adapter("default")
    assert sorted(tf_lora.adapters.from_model(model, mapping="paths")) == ["d1", "d2"]
