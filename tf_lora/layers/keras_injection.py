"""tf_lora.inject_lora: LoRA adapters on the Dense and EinsumDense layers of a Keras model, at any depth."""

import re

import keras

from tf_lora.layers.conversion import check_convertible, forget_traces, to_lora
from tf_lora.layers.lora_layer import LoraAdapters
from tf_lora.layers.lora_model import mark
from tf_lora.layers.model_layers import describe_paths, layers_by_path, lora_kind


def inject_lora(
    model,
    rank=8,
    alpha=16.0,
    target=None,
    use_rslora=False,
    lora_dropout=0.0,
    train_bias=False,
    rank_pattern=None,
    alpha_pattern=None,
    copy=True,
    use_dora=False,
):
    """Puts LoRA on the Dense and EinsumDense layers of a Keras model that match `target`, at any depth.

    Works on functional, Sequential and subclassed models, and on keras-hub backbones and task models, where
    the attention projections are EinsumDense layers inside the transformer blocks. Each matching layer
    becomes a `LoraDense` or `LoraEinsumDense` (subclasses of Dense/EinsumDense keeping their `call` get a
    LoRA subclass of their own) with every weight kept and a new adapter at zero (B = 0), so the model gives
    the same outputs until it is trained. As PEFT does, the rest of the model is frozen: only the adapters
    (`lora_a`, `lora_b`) are trainable.

    Args:
      model: A built keras.Model.
      rank, alpha, use_rslora, use_dora, lora_dropout, train_bias: As LoraDense.
      target: None (every Dense and EinsumDense layer, as PEFT's "all-linear"), a regex full-matched
        against each layer's path (`transformer_layer_0/self_attention/query`) and its name, or a list of
        paths or names. A target may also name Embedding layers (keras-hub's `token_embedding` included):
        they become LoraEmbedding, LoRA on the table as PEFT defines it.
      rank_pattern, alpha_pattern: `{regex: value}`, as PEFT's config: a layer whose path (or its last
        parts, or its name) fully matches a key gets that rank / alpha instead.
      copy: True (default): `model` is left as it was and a copy is adapted (built from the model's config,
        with its weights). False: `model` itself is adapted in place, with no copy of its weights (large
        models).

    A Dense with Keras's own LoRA enabled (`enable_lora`) keeps its trained adapter: it becomes a LoraDense
    of Keras's rank and alpha holding `lora_kernel_a` / `lora_kernel_b` (the same math).

    Returns:
      (the adapted model: a copy of `model`, or `model` itself with copy=False; the sorted paths of the
      adapted layers).

    Raises:
      ValueError: no layer matches `target` (the message lists the layers that can take LoRA), `target` is
        not a valid regex, or a listed name is not a Dense or EinsumDense layer of the model. Nothing is
        changed then.

    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="proj")])
    >>> lora_model, adapted = tf_lora.inject_lora(model, rank=2, alpha=4, target="proj")
    >>> adapted
    ['proj']
    """
    layers = layers_by_path(model)
    linear = target is None  # as PEFT's "all-linear": every Dense and EinsumDense, no embedding table
    candidates = {
        path: layer
        for path, layer in layers.items()
        if lora_kind(layer) in (("dense", "einsum") if linear else ("dense", "einsum", "embedding"))
    }
    chosen = _chosen(layers, candidates, ".*" if linear else target)
    problems = [p for p in (check_convertible(layers[path], path) for path in chosen) if p]
    problems += [
        f"{path} has LoRA already (adapters {layers[path].adapter_names}, rank {layers[path].rank}): "
        "leave it out of target, or add another adapter with add_adapter"
        for path in sorted(chosen)
        if isinstance(layers[path], LoraAdapters)
    ]
    for what, patterns in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        unused = [key for key in patterns or {} if not any(_matches(key, p, layers[p].name) for p in chosen)]
        if unused:
            problems.append(
                f"{what} keys {unused} match none of the layers to adapt (by path: {describe_paths(chosen)})"
            )
    if problems:
        raise ValueError("inject_lora: nothing changed; " + "; ".join(problems))
    ranks = {path: _pattern(rank_pattern, path, layers[path].name, rank) for path in chosen}
    alphas = {path: _pattern(alpha_pattern, path, layers[path].name, alpha) for path in chosen}
    if copy:
        model = copy_model(model)
        layers = layers_by_path(model)
    for variable in model.weights:  # the base model is frozen; the new adapters are trained
        variable.trainable = False
    # In the model's order, not the set's (which follows string hashing, PYTHONHASHSEED): each adapter's A
    # draws from Keras's seed generator in turn, so a seeded script makes the same adapters in every process.
    for path in (p for p in layers if p in chosen):
        to_lora(layers[path], ranks[path], alphas[path], use_rslora, lora_dropout, train_bias, use_dora)
    for layer in layers.values():  # every LoRA layer's active adapter trains, this call's and earlier ones'
        if isinstance(layer, LoraAdapters):
            layer._set_trainable()  # noqa: SLF001
            if getattr(layer, "bias", None) is not None:
                layer.bias.trainable = layer.train_bias
    forget_traces(model)
    mark(model)
    return model, sorted(chosen)


def copy_model(model):
    """A new model with `model`'s config and weights (its class's own from_config: keras-hub models too)."""
    try:
        clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(model))
    except Exception as e:  # noqa: BLE001 - whatever the model's own get_config/from_config raise
        raise ValueError(
            f"inject_lora: cannot copy {type(model).__name__} (it does not rebuild from its config: {e}); "
            "pass copy=False to adapt the model in place"
        ) from e
    if not clone.built and model.built:
        clone.build_from_config(model.get_build_config())
    # A layer with Keras's own LoRA is rebuilt without it when its parent builds it (keras-hub): enable it
    # the same way on the copy, so that the weights line up.
    old_layers = layers_by_path(model)
    for path, layer in layers_by_path(clone).items():
        old = old_layers.get(path)
        if getattr(old, "lora_enabled", False) and not getattr(layer, "lora_enabled", False):
            layer.enable_lora(old.lora_rank, lora_alpha=old.lora_alpha)
    clone.set_weights(model.get_weights())
    for new, old in zip(clone.weights, model.weights, strict=True):
        new.trainable = old.trainable
    # Keras's Dense.build enables LoRA from the config with alpha = rank, whatever lora_alpha said.
    for path, layer in layers_by_path(clone).items():
        if getattr(layer, "lora_enabled", False) and path in old_layers:
            layer.lora_alpha = old_layers[path].lora_alpha
    return clone


def _chosen(layers, candidates, target):
    names = {}
    for path, layer in candidates.items():
        names.setdefault(layer.name, []).append(path)
    if isinstance(target, str):
        try:
            pattern = re.compile(target)
        except re.error as e:
            raise ValueError(f"inject_lora: target {target!r} is not a valid regular expression: {e}") from e
        chosen = {
            path
            for path, layer in candidates.items()
            if pattern.fullmatch(path) or pattern.fullmatch(layer.name)
        }
        if not chosen:
            raise ValueError(
                f"inject_lora: no Dense, EinsumDense or Embedding layer matches {target!r} (they are, by "
                f"path: {describe_paths(candidates)})"
            )
        return chosen
    chosen, missing = set(), []
    for item in target:
        if item in candidates:
            chosen.add(item)
        elif item in names:
            chosen.update(names[item])
        else:
            missing.append(item)
    if missing:
        others = [m for m in missing if m in layers or any(p.endswith("/" + m) for p in layers)]
        raise ValueError(
            f"inject_lora: {missing} are not Dense, EinsumDense or Embedding layers of the model"
            + (f" ({others} are other layers)" if others else "")
            + f" (those by path: {describe_paths(candidates)})"
        )
    if not chosen:
        raise ValueError("inject_lora: target lists no layer")
    return chosen


def _matches(key, path, name):
    """Whether a rank_pattern / alpha_pattern key fully matches the path, its last parts, or the name."""
    try:
        return bool(re.fullmatch(rf"(.*/)?(?:{key})", path) or re.fullmatch(key, name))
    except re.error as e:
        raise ValueError(f"inject_lora: pattern key {key!r} is not a valid regular expression: {e}") from e


def _pattern(patterns, path, name, default):
    """PEFT's rank_pattern / alpha_pattern: the value of the first key that matches the layer."""
    for key, value in (patterns or {}).items():
        if _matches(key, path, name):
            return value
    return default
