"""tf_lora.inject_lora: LoRA adapters on the Dense layers of an existing Keras model."""

import re

import keras

from tf_lora.layers.lora_dense import LoraDense


def inject_lora(model, rank=8, alpha=16.0, target=".*", use_rslora=False, lora_dropout=0.0, train_bias=False):
    """Turns the Dense layers of a Sequential or functional model that match `target` into LoraDense.

    Every weight is kept, and the new adapters start at zero (lora_b = 0), so the returned model gives the
    same outputs as `model` until it is trained. As PEFT does, the base model is frozen: only the adapters
    (lora_a, lora_b) are trainable. `model` itself is not changed.

    Args:
      model: A Sequential or functional keras.Model.
      rank, alpha, use_rslora, lora_dropout, train_bias: As LoraDense.
      target: A regex (full match on the layer name) or a list of layer names.

    A Dense layer with Keras's own LoRA enabled (`enable_lora`, `lora_rank`) keeps its trained adapter:
    it becomes a LoraDense of that rank and alpha holding Keras's `lora_kernel_a` / `lora_kernel_b` (the
    same math: `kernel + lora_alpha / lora_rank * a @ b`), whatever `rank` and `alpha` say.

    Returns:
      (new model, sorted names of the adapted layers).

    Raises:
      ValueError: no Dense layer matches `target`, `target` is not a valid regex, or a listed name is not
        a Dense layer of the model.

    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="proj")])
    >>> lora_model, adapted = tf_lora.inject_lora(model, rank=2, alpha=4, target="proj")
    >>> adapted
    ['proj']
    """
    dense = {layer.name for layer in model.layers if type(layer) is keras.layers.Dense}
    if isinstance(target, str):
        try:
            pattern = re.compile(target)
        except re.error as e:
            raise ValueError(f"inject_lora: target {target!r} is not a valid regular expression: {e}") from e
        chosen = {name for name in dense if pattern.fullmatch(name)}
    else:
        missing = sorted(set(target) - dense)
        if missing:
            raise ValueError(
                f"inject_lora: {missing} are not Dense layers of the model (Dense: {sorted(dense)})"
            )
        chosen = set(target)
    if not chosen:
        raise ValueError(f"inject_lora: no Dense layer matches {target!r} (Dense layers: {sorted(dense)})")

    def clone(layer):
        if layer.name in chosen:
            config = layer.get_config()
            keras_rank, keras_alpha = config.pop("lora_rank", None), config.pop("lora_alpha", None)
            return LoraDense(
                rank=keras_rank or rank,
                alpha=(keras_alpha or keras_rank) if keras_rank else alpha,
                use_rslora=use_rslora and not keras_rank,
                lora_dropout=lora_dropout,
                train_bias=train_bias,
                **config,
            )
        return layer.__class__.from_config(layer.get_config())

    new_model = keras.models.clone_model(model, clone_function=clone)
    for old in model.layers:
        if not old.weights:  # input layers (renamed by the clone), activations, dropout...
            continue
        new = new_model.get_layer(old.name)
        if old.name in chosen:
            keras_lora = bool(getattr(old, "lora_enabled", False))
            new.kernel.assign(old._kernel if keras_lora else old.kernel)  # noqa: SLF001 - Keras's base kernel
            if keras_lora:
                new.lora_a.assign(old.lora_kernel_a)
                new.lora_b.assign(old.lora_kernel_b)
            if old.use_bias:
                new.bias.assign(old.bias)
        else:
            new.set_weights(old.get_weights())
            new.trainable = False
    return new_model, sorted(chosen)
