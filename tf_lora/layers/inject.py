"""tf_lora.inject_lora: LoRA adapters on the Dense layers of an existing Keras model."""

import re

import keras

from tf_lora.layers.lora_dense import LoraDense


def inject_lora(model, rank=8, alpha=16.0, target=".*", use_rslora=False, lora_dropout=0.0):
    """Turns the Dense layers of a Sequential or functional model that match `target` into LoraDense.

    Every weight is kept, and the new adapters start at zero (lora_b = 0), so the returned model gives the
    same outputs as `model` until it is trained. As PEFT does, the base model is frozen: only the adapters
    (lora_a, lora_b) are trainable. `model` itself is not changed.

    Args:
      model: A Sequential or functional keras.Model.
      rank, alpha, use_rslora, lora_dropout: As LoraDense.
      target: A regex (full match on the layer name) or a list of layer names.

    Returns:
      (new model, sorted names of the adapted layers).

    Raises:
      ValueError: no Dense layer matches `target`, or a listed name is not a Dense layer of the model.

    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="proj")])
    >>> lora_model, adapted = tf_lora.inject_lora(model, rank=2, alpha=4, target="proj")
    >>> adapted
    ['proj']
    """
    dense = {layer.name for layer in model.layers if type(layer) is keras.layers.Dense}
    if isinstance(target, str):
        chosen = {name for name in dense if re.fullmatch(target, name)}
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
            return LoraDense(
                rank=rank, alpha=alpha, use_rslora=use_rslora, lora_dropout=lora_dropout, **layer.get_config()
            )
        return layer.__class__.from_config(layer.get_config())

    new_model = keras.models.clone_model(model, clone_function=clone)
    for old in model.layers:
        if not old.weights:  # input layers (renamed by the clone), activations, dropout...
            continue
        new = new_model.get_layer(old.name)
        if old.name in chosen:
            new.kernel.assign(old.kernel)
            if old.use_bias:
                new.bias.assign(old.bias)
                new.bias.trainable = False
        else:
            new.set_weights(old.get_weights())
            new.trainable = False
    return new_model, sorted(chosen)
