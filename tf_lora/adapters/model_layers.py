"""What the adapter tools share about a Keras model: its layers at any depth, and how module names in
adapter files map to layer names."""

import re


def all_layers(model):
    """Every layer of a Keras model, nested models' layers included, parents before children."""
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from all_layers(layer)


def module_mapper(mapping):
    """A function from an adapter file's module name to a layer name (None: no layer): the identity for
    None, `mapping` itself when callable, else the first of its (regex, replacement) pairs that fully
    matches."""
    if mapping is None:
        return lambda module: module
    if callable(mapping):
        return mapping
    compiled = [(re.compile(pattern), replacement) for pattern, replacement in mapping]

    def to_layer(module):
        for pattern, replacement in compiled:
            match = pattern.fullmatch(module)
            if match:
                return match.expand(replacement)
        return None

    return to_layer
