"""Model-level LoRA: the LoRA layers of a model at any depth, switching, merging and unloading them all,
and `.keras` files that keep them.

A keras-hub backbone (or any layer that builds its sublayers itself) recreates its Dense and EinsumDense
layers as plain ones when loaded, so the layer configs alone cannot bring adapters back. A model holding
LoRA layers therefore saves under `tf_lora>LoraModel`: its own config plus where its LoRA layers are and
what adapters they hold. Loading rebuilds the model from its own config, puts the LoRA layers back at the
same paths, and only then loads the weights, so every adapter, the active one, merged state and the
trainable set come back.
"""

import keras
import numpy as np
import tensorflow as tf

from tf_lora.layers.conversion import refresh_call_signature, to_lora
from tf_lora.layers.keras_lora_layout import to_keras_factors
from tf_lora.layers.kernel_layout import kernel_variable, layer_view
from tf_lora.layers.lora_layer import LoraAdapters, adapter_ids
from tf_lora.layers.model_layers import layers_by_path

REGISTERED_NAME = "tf_lora>LoraModel"


def lora_layers(model) -> dict:
    """`{path: layer}` of the LoRA layers (LoraDense, LoraEinsumDense, ...) of `model` at any depth.

    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="proj")])
    >>> model, _ = tf_lora.inject_lora(model)
    >>> list(tf_lora.layers.lora_layers(model))
    ['proj']
    """
    return {path: layer for path, layer in layers_by_path(model).items() if isinstance(layer, LoraAdapters)}


def _spec(model):
    return {
        "layers": {
            path: {"class": type(layer).__name__, **layer._lora_config()}  # noqa: SLF001
            for path, layer in lora_layers(model).items()
        },
        "trainable": sorted(v.path for v in model.weights if v.trainable),
        # The same set by layer path and variable name, which a reloaded model gives back: Keras names the
        # variables of a model nested in another by where they were built, not where they load.
        "trainable_weights": sorted(_weight_key(model)(v) for v in model.weights if v.trainable),
    }


def _weight_key(model):
    """variable -> "<layer path>/<variable name>" (by its innermost layer; its path when no layer has it),
    the map built once."""
    keys = {}
    for path, layer in layers_by_path(model).items():  # parents before the layers inside them
        for variable in layer.weights:
            keys[id(variable)] = f"{path}/{variable.name}"
    return lambda variable: keys.get(id(variable), variable.path)


def _base_class(cls):
    """The model class under tf_lora's LoRA-model subclass."""
    return cls.__bases__[0] if getattr(cls, "_tf_lora_model", False) else cls


class _LoraModelLoader:
    """What `tf_lora>LoraModel` names when no model of that kind was made in this process yet."""

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return _load(config, custom_objects)

    def get_config(self):  # registration asks for one
        raise NotImplementedError


def _load(config, custom_objects=None):
    base = config["base"]
    model = keras.saving.deserialize_keras_object(base, custom_objects=custom_objects)
    if not model.built and base.get("build_config"):
        model.build_from_config(base["build_config"])
    layers = layers_by_path(model)
    spec = config["lora"]
    missing = sorted(set(spec["layers"]) - set(layers))
    if missing:
        raise ValueError(f"tf_lora: the model rebuilt from its config has no layers {missing} to put LoRA on")
    for path, layer_spec in spec["layers"].items():
        layer = layers[path]
        if not isinstance(layer, LoraAdapters):
            to_lora(
                layer,
                layer_spec["rank"],
                layer_spec["alpha"],
                layer_spec["use_rslora"],
                layer_spec["lora_dropout"],
                layer_spec["train_bias"],
                layer_spec.get("use_dora", False),
            )
            for adapter in layer_spec["adapters"]:
                layer.add_adapter(**adapter)
            layer.set_active_adapter(layer_spec["active_adapter"])
    if "trainable_weights" in spec:
        trainable, key = set(spec["trainable_weights"]), _weight_key(model)
    else:  # a file written before tf_lora kept the set by layer path
        trainable, key = set(spec["trainable"]), (lambda variable: variable.path)
    for variable in model.weights:
        variable.trainable = key(variable) in trainable
    mark(model)
    return model


def mark(model):
    """Makes `model` save as `tf_lora>LoraModel` (its class becomes a subclass of its own that adds the LoRA
    layout to its config). Called by everything that puts LoRA layers into a model in place."""
    cls = type(model)
    if getattr(cls, "_tf_lora_model", False):
        return model

    def get_config(self):
        marked = type(self)
        self.__class__ = cls  # serialized as its own class would be
        try:
            base = keras.saving.serialize_keras_object(self)
        finally:
            self.__class__ = marked
        base.pop("compile_config", None)  # Keras compiles the loaded model from the outer config
        return {"base": base, "lora": _spec(self)}

    lora_cls = type(
        cls.__name__,
        (cls,),
        {
            "_tf_lora_model": True,
            "__module__": __name__,
            "__qualname__": cls.__qualname__,
            "get_config": get_config,
            "from_config": classmethod(lambda _, config, custom_objects=None: _load(config, custom_objects)),
        },
    )
    keras.saving.register_keras_serializable(package="tf_lora", name="LoraModel")(lora_cls)
    model.__class__ = lora_cls
    return model


def unmark(model):
    """Gives `model` its own class back (it then saves as that class, without LoRA)."""
    model.__class__ = _base_class(type(model))
    return model


@keras.saving.register_keras_serializable(package="tf_lora")
class PerExampleAdapters(keras.Model):
    """`model` serving per-example adapters in every LoRA layer, however deep: called on
    `(inputs, adapter_ids)`, `adapter_ids[i]` naming example `i`'s adapter by its index in the layers'
    `adapter_names` (-1: the base model). The ids are an input of the call, so Keras's traced predict,
    `model.export(...)` and `tf.function`s take new ids on every call.

    >>> model, _ = tf_lora.inject_lora(keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="p")]))
    >>> model.get_layer("p").add_adapter("other")
    >>> served = tf_lora.layers.PerExampleAdapters(model)
    >>> served((tf.ones([2, 4]), tf.constant([1, -1]))).shape
    TensorShape([2, 3])
    """

    def __init__(self, model, **kwargs):
        super().__init__(**kwargs)
        self.model = model
        self._convert_input_args = False  # Keras would cast the ids to floats; the model converts its own

    def __call__(self, inputs, *args, **kwargs):
        # Without Keras's conversion, Keras refuses numpy (and list) inputs: they become tensors here, the
        # ids as they are (integers stay integers).
        if isinstance(inputs, tuple | list) and len(inputs) == 2:
            x, ids = inputs
            x = tf.nest.map_structure(
                lambda v: tf.convert_to_tensor(v) if isinstance(v, np.ndarray) else v, x
            )
            if isinstance(ids, np.ndarray | list | tuple | int):  # (symbolic Keras inputs pass as they are)
                ids = tf.convert_to_tensor(ids)
            inputs = (x, ids)
        return super().__call__(inputs, *args, **kwargs)

    def call(self, inputs, training=None):
        x, ids = inputs
        ids = tf.convert_to_tensor(ids)
        if not ids.dtype.is_integer:
            ids = tf.cast(tf.round(ids), tf.int32)
        with adapter_ids(ids):
            return self.model(x, training=training)

    def get_config(self):
        config = keras.layers.Layer.get_config(self)
        return {**config, "model": keras.saving.serialize_keras_object(self.model)}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        model = keras.saving.deserialize_keras_object(config.pop("model"), custom_objects=custom_objects)
        return cls(model, **config)


def set_active_adapter(model, name):
    """Makes adapter `name` (None: none) the active one in every LoRA layer of `model` that holds it;
    ValueError when none does. Compile again before `fit` (the trainable set changes).

    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="proj")])
    >>> model, _ = tf_lora.inject_lora(model)
    >>> model.get_layer("proj").add_adapter("sql")
    >>> tf_lora.set_active_adapter(model, "sql")
    >>> model.get_layer("proj").active_adapter
    'sql'
    """
    layers = lora_layers(model)
    holding = [layer for layer in layers.values() if name is None or name in layer.adapter_names]
    if not holding:
        known = sorted({n for layer in layers.values() for n in layer.adapter_names})
        raise ValueError(f"set_active_adapter: no LoRA layer holds adapter {name!r} (adapters: {known})")
    for layer in holding:
        layer.set_active_adapter(name)


def merge(model):
    """Merges the active adapter of every LoRA layer into its weight, in place.

    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="proj")])
    >>> model, _ = tf_lora.inject_lora(model)
    >>> tf_lora.layers.merge(model)
    >>> model.get_layer("proj").merged
    True
    """
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge(model):
    """Takes every merged adapter out of its layer's weight again.

    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="proj")])
    >>> model, _ = tf_lora.inject_lora(model)
    >>> tf_lora.layers.merge(model)
    >>> tf_lora.layers.unmerge(model)
    >>> model.get_layer("proj").merged
    False
    """
    for layer in lora_layers(model).values():
        layer.unmerge()


def _unload(layer):
    """Turns a LoRA layer back into the plain Keras layer it came from, in place, dropping its adapters'
    variables (the weight stays as it is)."""
    variables = [v for slot in layer._slots.values() for v in slot.variables]  # noqa: SLF001
    variables += [layer.lora_active, layer.lora_active_adapter, layer.lora_adapters_version]
    for variable in variables:
        layer._untrack_variable(variable)  # noqa: SLF001
        if variable.name in layer.__dict__:
            delattr(layer, variable.name)
    layer.__class__ = next(c for c in type(layer).__mro__ if not issubclass(c, LoraAdapters))
    keras_quantize = layer.__dict__.pop("_tf_lora_keras_quantize", None)  # see to_lora
    if keras_quantize is not None:
        layer.quantize = keras_quantize
    refresh_call_signature(layer)


def merge_and_unload(model):
    """Merges the active adapters into the weights and turns every LoRA layer back into the plain Keras
    layer it came from (Dense, EinsumDense, or the subclass it was), in place, as PEFT's merge_and_unload:
    the model then holds no tf_lora layer and its `.keras` file loads without tf_lora. The weights become
    trainable again, as in a freshly built Keras layer. Returns `model`.

    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="proj")])
    >>> model, _ = tf_lora.inject_lora(model)
    >>> type(tf_lora.merge_and_unload(model).get_layer("proj")).__name__
    'Dense'
    """
    for layer in lora_layers(model).values():
        layer.merge()
        _unload(layer)
    for variable in model.weights:
        variable.trainable = True
    unmark(model)
    return model


def to_keras_lora(model):
    """Turns every LoRA layer's active adapter into Keras's own LoRA (`enable_lora`, `lora_kernel_a` /
    `lora_kernel_b`, alpha = rank), exactly, in place: the inverse of what `inject_lora` does with a
    Keras-LoRA layer. All layers get one rank (the largest needed; smaller adapters are zero-padded, which
    changes nothing), so that a keras-hub backbone's `save_lora_weights` writes them. DoRA adapters have no
    Keras form. Returns `model`.

    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="proj")])
    >>> model, _ = tf_lora.inject_lora(model, rank=2)
    >>> tf_lora.layers.to_keras_lora(model).get_layer("proj").lora_enabled
    True
    """
    layers = lora_layers(model)
    factors = {}
    for path, layer in layers.items():
        slot = layer.adapter_slot(layer.active_adapter) if layer.active_adapter else None
        if slot is not None and slot.use_dora:
            raise ValueError(f"to_keras_lora: {path}: a DoRA adapter has no Keras LoRA form")
        if slot is None:
            continue
        view = layer_view(layer)
        scale = float(slot.scale_var.numpy())
        layer.unmerge()
        kernel_shape = tuple(kernel_variable(layer).shape)
        factors[path] = to_keras_factors(view, kernel_shape, slot.a.numpy(), slot.b.numpy(), scale)
    rank = max((a.shape[-1] for a, _ in factors.values()), default=0)
    for path, layer in layers.items():
        _unload(layer)
        if path not in factors:
            continue
        a, b = factors[path]
        layer.enable_lora(rank, lora_alpha=rank)
        layer.lora_kernel_a.assign(np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, rank - a.shape[-1])]))
        layer.lora_kernel_b.assign(np.pad(b, [(0, rank - b.shape[0]), (0, 0)]))
    backbone = keras_hub_backbone(model)
    if backbone is not None and factors:
        weighted = [layer for layer in backbone._flatten_layers(include_self=False) if layer.weights]  # noqa: SLF001
        backbone._lora_enabled_layers = [
            i for i, layer in enumerate(weighted) if getattr(layer, "lora_enabled", False)
        ]  # noqa: SLF001
        backbone._lora_rank = rank  # noqa: SLF001
    unmark(model)
    return model


def keras_hub_backbone(model):
    """The keras-hub Backbone in `model` (itself, or a task model's), or None."""
    for layer in [model, *layers_by_path(model).values()]:
        if any(
            c.__name__ == "Backbone" and c.__module__.startswith("keras_hub") for c in type(layer).__mro__
        ):
            return layer
    return None


keras.saving.register_keras_serializable(package="tf_lora", name="LoraModel")(_LoraModelLoader)
