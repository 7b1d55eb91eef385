"""How module names in adapter files map to a Keras model's layers (found at any depth by
tf_lora.layers.model_layers.layers_by_path)."""

import re


def resolve_layer(layers, key):
    """The path in `layers` ({path: layer}) that `key` names: a path, or the name of exactly one layer;
    None for none. Several layers of that name: ValueError listing their paths."""
    if key is None:
        return None
    if key in layers:
        return key
    paths = [path for path, layer in layers.items() if layer.name == key]
    if len(paths) > 1:
        raise ValueError(f"layer name {key!r} is ambiguous: layers {sorted(paths)} have it; map to a path")
    return paths[0] if paths else None


def module_mapper(mapping):
    """A function from an adapter file's module name to a layer name (None: no layer): the identity for
    None, `mapping` itself when callable, else the first of its (regex, replacement) pairs that fully
    matches (a dict: its items, so `{module: layer}` works too)."""
    if mapping is None:
        return lambda module: module
    if callable(mapping):
        return mapping
    pairs = list(mapping.items()) if isinstance(mapping, dict) else mapping
    if not isinstance(pairs, list | tuple) or not all(
        isinstance(p, tuple | list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in pairs
    ):
        raise TypeError(
            "mapping must be None, a function (module -> layer path or None), a list of (regex, replacement) "
            f"pairs or a dict of them; got {mapping!r}"
        )
    compiled = [(re.compile(pattern), replacement) for pattern, replacement in pairs]

    def to_layer(module):
        for pattern, replacement in compiled:
            match = pattern.fullmatch(module)
            if match:
                return match.expand(replacement)
        return None

    return to_layer
