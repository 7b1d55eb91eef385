"""The layers of a Keras model at any depth, by path, and which of them can take LoRA."""

import keras

from tf_lora.layers.lora_layer import LoraAdapters


def layers_by_path(model) -> dict:
    """`{path: layer}` for every layer under `model` at any depth (functional, Sequential, subclassed,
    keras-hub backbones and task models), parents before children. A path is the layer names from the
    model down, joined by '/' (`transformer_layer_0/self_attention/query`), as Keras names the layers'
    variables; a layer reachable twice (shared) keeps its first path."""
    found, seen = {}, set()

    def visit(layer, prefix):
        for child in layer._layers:  # noqa: SLF001 - Keras's own list of a layer's sublayers
            if id(child) in seen:
                continue
            seen.add(id(child))
            path = f"{prefix}{child.name}"
            found.setdefault(path, child)
            visit(child, path + "/")

    visit(model, "")
    return found


def lora_kind(layer):
    """'dense', 'einsum', 'embedding' or None: how LoRA adapts `layer`. Subclasses count when they keep the
    base call (a subclass with its own call computes something LoRA's update does not know), and Keras's
    ReversibleEmbedding (a tied input/output table: its lookup is Embedding's)."""
    if isinstance(layer, LoraAdapters):
        if isinstance(layer, keras.layers.Embedding):
            return "embedding"
        return "dense" if isinstance(layer, keras.layers.Dense) else "einsum"
    if isinstance(layer, keras.layers.Embedding):
        calls = {keras.layers.Embedding.call} | {
            c.call for c in type(layer).__mro__ if c.__name__ == "ReversibleEmbedding"
        }
        return "embedding" if type(layer).call in calls else None
    if isinstance(layer, keras.layers.Dense) and type(layer).call is keras.layers.Dense.call:
        return "dense"
    if isinstance(layer, keras.layers.EinsumDense) and type(layer).call is keras.layers.EinsumDense.call:
        return "einsum"
    return None


def describe_paths(paths, limit=24):
    """A list of paths for an error message, cut after `limit`."""
    paths = sorted(paths)
    shown = ", ".join(paths[:limit])
    return f"[{shown}{f', ... ({len(paths)} in all)' if len(paths) > limit else ''}]"
