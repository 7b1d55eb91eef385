"""Keras's own LoRA files: the `.lora.h5` that keras-hub's `Backbone.save_lora_weights` writes and
`load_lora_weights` reads, to and from tf_lora adapters.

The file holds `lora/vars/rank` and, per adapted layer, `lora/<i>/vars/lora_kernel_a` and `lora_kernel_b`,
where `i` indexes the backbone's layers that have weights, in Keras's flattening order; keras-hub's
`enable_lora(rank)` makes alpha the rank, so the update is `a @ b`. The factors are in Keras's layout
(tf_lora.layers.keras_lora_layout converts them exactly).
"""

import os
import tempfile
import warnings

import h5py
import numpy as np

from tf_lora.adapters.adapter import Adapter, AdapterSet
from tf_lora.layers.keras_lora_layout import from_keras_factors, to_keras_factors
from tf_lora.layers.kernel_layout import kernel_variable, layer_view
from tf_lora.layers.lora_layer import LoraAdapters
from tf_lora.layers.lora_model import keras_hub_backbone
from tf_lora.layers.model_layers import layers_by_path, lora_kind

SUFFIX = ".lora.h5"


def _weighted_layers(model):
    """(backbone, [(path in model, layer)] of the backbone's layers with weights, in keras-hub's order)."""
    backbone = keras_hub_backbone(model)
    if backbone is None:
        raise ValueError(
            "Keras .lora.h5 files index the layers of a keras-hub Backbone; the model holds none"
        )
    paths = {id(layer): path for path, layer in layers_by_path(model).items()}
    weighted = [layer for layer in backbone._flatten_layers(include_self=False) if layer.weights]  # noqa: SLF001
    return backbone, [(paths.get(id(layer), layer.name), layer) for layer in weighted]


def load_keras_lora(path, model) -> AdapterSet:
    """Reads a keras-hub `.lora.h5` file for `model` (a keras-hub backbone or task model of the architecture
    that wrote it): `{layer path: Adapter}` in tf_lora's layout, ready for `apply(model, ...)`.

    Raises:
      ValueError: not such a file, an index with no layer, or factors whose shapes do not fit the layer;
        nothing is returned then.
    """
    _, layers = _weighted_layers(model)
    adapters, problems = {}, []
    try:
        with h5py.File(os.fspath(path), "r") as f:
            rank = int(f["lora/vars/rank"][()])
            entries = {key: f[f"lora/{key}/vars"] for key in f["lora"] if key != "vars"}
            for key, group in sorted(entries.items(), key=lambda item: int(item[0])):
                index = int(key)
                if index >= len(layers):
                    problems.append(
                        f"layer index {index}: the backbone has {len(layers)} layers with weights"
                    )
                    continue
                layer_path, layer = layers[index]
                a_keras, b_keras = np.asarray(group["lora_kernel_a"]), np.asarray(group["lora_kernel_b"])
                kernel = tuple(kernel_variable(layer).shape) if lora_kind(layer) else None
                if (
                    kernel is None
                    or a_keras.shape != kernel[:-1] + (rank,)
                    or b_keras.shape != (rank, kernel[-1])
                ):
                    problems.append(
                        f"layer {index} ({layer_path}): factors {a_keras.shape} and {b_keras.shape} do not "
                        f"fit a kernel {kernel} at rank {rank}"
                    )
                    continue
                a, b = from_keras_factors(layer_view(layer), a_keras, b_keras)
                adapters[layer_path] = Adapter(
                    a,
                    b,
                    alpha=float(a.shape[1]),
                    module=layer_path,
                    metadata={"format": "keras", "path": os.fspath(path)},
                )
    except (OSError, KeyError, ValueError) as e:
        if problems:
            raise ValueError(f"load_keras_lora: {path}: " + "; ".join(problems)) from None
        raise ValueError(f"load_keras_lora: {path} is not a Keras .lora.h5 file: {e}") from None
    if problems:
        raise ValueError(f"load_keras_lora: {path}: " + "; ".join(problems))
    if not adapters:
        raise ValueError(f"load_keras_lora: {path} holds no LoRA weights")
    return AdapterSet(adapters)


def save_keras_lora(model, path, adapter_name="default"):
    """Writes the adapter `adapter_name` of `model`'s LoRA layers as a keras-hub `.lora.h5` file, exactly
    (one rank for all layers, smaller adapters zero-padded; each scale folded into `b`), that keras-hub's
    `load_lora_weights` reads once `enable_lora(rank, target_layer_names)` has made the same layers LoRA
    (its default is the query and value projections). The file appears complete or not at all."""
    path = os.fspath(path)
    if not path.endswith(SUFFIX):
        raise ValueError(f"save_keras_lora: keras-hub needs the file name to end in {SUFFIX}, got {path}")
    backbone, layers = _weighted_layers(model)
    factors = {}
    for index, (layer_path, layer) in enumerate(layers):
        if not isinstance(layer, LoraAdapters) or adapter_name not in layer.adapter_names:
            continue
        slot = layer.adapter_slot(adapter_name)
        if slot.use_dora:
            raise ValueError(f"save_keras_lora: {layer_path}: a DoRA adapter has no Keras LoRA form")
        kernel = tuple(kernel_variable(layer).shape)
        factors[index] = to_keras_factors(
            layer_view(layer), kernel, slot.a.numpy(), slot.b.numpy(), slot.scale
        )
    if not factors:
        raise ValueError(f"save_keras_lora: no LoRA layer of the backbone has an adapter {adapter_name!r}")
    names = sorted({layers[i][1].name for i in factors})
    # Keras's rank for the file; a per-head kernel's can exceed the adapter's (to_keras_factors).
    rank = max(a.shape[-1] for a, _ in factors.values())
    default = getattr(backbone, "default_lora_layer_names", lambda: None)()
    if default is not None and set(names) - set(default):
        warnings.warn(
            f"save_keras_lora: {path} holds LoRA for layers {names}; keras-hub's load_lora_weights on a "
            f"fresh backbone enables only its defaults {sorted(default)}: call "
            f"backbone.enable_lora({rank}, target_layer_names={names}) before it",
            stacklevel=2,
        )
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=".tf_lora_", suffix=SUFFIX, dir=parent)
    os.close(fd)
    try:
        with h5py.File(staging, "w") as f:
            f.create_dataset("lora/vars/rank", data=rank)
            for index, (a, b) in factors.items():
                f.create_dataset(
                    f"lora/{index}/vars/lora_kernel_a",
                    data=np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, rank - a.shape[-1])]),
                )
                f.create_dataset(
                    f"lora/{index}/vars/lora_kernel_b", data=np.pad(b, [(0, rank - b.shape[0]), (0, 0)])
                )
        os.replace(staging, path)
    except BaseException:
        os.unlink(staging)
        raise
    return names
