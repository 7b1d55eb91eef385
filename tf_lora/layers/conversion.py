"""Turning a built Keras Dense or EinsumDense layer into its LoRA layer in place, wherever it sits in a
model: the object stays (so the parent layer, the functional graph and every reference keep working) and
gains the adapters' variables; its weights are kept."""

import inspect

import keras
import numpy as np

from tf_lora.layers.keras_lora_layout import from_keras_factors
from tf_lora.layers.kernel_layout import EinsumView, adapted_norm, kernel_variable, layer_view
from tf_lora.layers.lora_dense import LoraDense
from tf_lora.layers.lora_einsum_dense import LoraEinsumDense
from tf_lora.layers.lora_embedding import LoraEmbedding
from tf_lora.layers.lora_layer import DEFAULT_ADAPTER, LoraAdapters
from tf_lora.layers.model_layers import lora_kind

_LORA_CLASSES = {
    "dense": (keras.layers.Dense, LoraDense),
    "einsum": (keras.layers.EinsumDense, LoraEinsumDense),
    "embedding": (keras.layers.Embedding, LoraEmbedding),
}
_SUBCLASSES = {}
# The variables of Keras's own enable_lora, by layer kind.
_KERAS_LORA_NAMES = {
    "dense": ("lora_kernel_a", "lora_kernel_b"),
    "einsum": ("lora_kernel_a", "lora_kernel_b"),
    "embedding": ("lora_embeddings_a", "lora_embeddings_b"),
}


def lora_class(layer_type, kind):
    """The LoRA class for a Dense/EinsumDense class: LoraDense/LoraEinsumDense for the Keras classes, else a
    subclass of both (registered for `.keras` files as `tf_lora>Lora<name>`)."""
    base, lora = _LORA_CLASSES[kind]
    if layer_type is base or issubclass(layer_type, LoraAdapters):
        return lora if layer_type is base else layer_type
    if layer_type not in _SUBCLASSES:
        cls = type(f"Lora{layer_type.__name__}", (lora, layer_type), {"__module__": __name__})
        _SUBCLASSES[layer_type] = keras.saving.register_keras_serializable(package="tf_lora")(cls)
    return _SUBCLASSES[layer_type]


def check_convertible(layer, path):
    """Why `layer` cannot take LoRA (a message), or None."""
    kind = lora_kind(layer)
    if kind is None:
        return f"{path}: a {type(layer).__name__}, not a Dense, EinsumDense or Embedding layer"
    if isinstance(layer, LoraAdapters):
        return None
    if not layer.built:
        return f"{path}: not built yet (call the model once first)"
    if getattr(layer, "quantization_mode", None):
        return f"{path}: quantized ({layer.quantization_mode}); LoRA needs a float kernel"
    if kind == "einsum":
        try:
            EinsumView.parse(layer.equation, kernel_variable(layer).shape, path)
        except ValueError as e:
            return str(e)
        if getattr(layer, "lora_enabled", False):
            try:
                names = _KERAS_LORA_NAMES[kind]
                from_keras_factors(layer_view(layer), *(getattr(layer, n).numpy() for n in names))
            except ValueError as e:
                return f"{path}: Keras's enable_lora is on, and {e}"
    return None


def to_lora(layer, rank, alpha, use_rslora=False, lora_dropout=0.0, train_bias=False, use_dora=False):
    """Makes built `layer` (Dense or EinsumDense, or a subclass keeping their call) a LoRA layer in place,
    with a default adapter of `rank` and `alpha` starting at zero (B = 0) and active. A layer that is one
    already is returned as it is. A layer with Keras's `enable_lora` keeps its trained adapter, exactly
    (Keras's rank and alpha win; tf_lora.layers.keras_lora_layout). Returns the layer.

    >>> layer = keras.layers.Dense(3)
    >>> _ = layer(tf.ones([1, 4]))
    >>> tf_lora.layers.to_lora(layer, rank=2, alpha=4).scale
    2.0
    """
    if isinstance(layer, LoraAdapters):
        return layer
    problem = check_convertible(layer, layer.name)
    if problem:
        raise ValueError(f"to_lora: {problem}")
    kind = lora_kind(layer)
    keras_adapter = None
    if getattr(layer, "lora_enabled", False):  # Keras's own LoRA: kernel + alpha / rank * a @ b
        variables = tuple(getattr(layer, name) for name in _KERAS_LORA_NAMES[kind])
        keras_adapter = from_keras_factors(layer_view(layer), *(v.numpy() for v in variables))
        scale = layer.lora_alpha / layer.lora_rank
        rank, use_rslora = keras_adapter[0].shape[1], False
        alpha = scale * rank  # the same scale at tf_lora's rank (heads * Keras's for a per-head kernel)
        layer._tracker.unlock()  # noqa: SLF001 - Keras's enable_lora unlocks it the same way
        for variable in variables:
            layer._untrack_variable(variable)  # noqa: SLF001
        for name in _KERAS_LORA_NAMES[kind]:
            delattr(layer, name)
        layer.lora_enabled = False
        layer._tracker.lock()  # noqa: SLF001
    layer.__class__ = lora_class(type(layer), kind)
    # Keras binds each layer's quantize into an instance attribute when it is made; the LoRA class's own
    # (a refusal) must answer instead, and Keras's is given back when the layer is unloaded.
    keras_quantize = layer.__dict__.pop("quantize", None)
    if keras_quantize is not None:
        layer._tf_lora_keras_quantize = keras_quantize  # noqa: SLF001
    refresh_call_signature(layer)
    describe = layer._describe()  # noqa: SLF001
    layer._lora_setup(
        rank, alpha, use_rslora, lora_dropout, (), DEFAULT_ADAPTER, train_bias, describe, use_dora
    )  # noqa: SLF001
    layer._tracker.unlock()  # noqa: SLF001
    try:
        layer._lora_build()  # noqa: SLF001
    finally:
        layer._tracker.lock()  # noqa: SLF001
    if keras_adapter is not None:
        slot = layer.adapter_slot()
        slot.a.assign(keras_adapter[0])
        slot.b.assign(keras_adapter[1])
        if slot.use_dora:  # DoRA starts at the adapted weight's norms, so the outputs stay the same
            slot.magnitude.assign(adapted_norm(layer, slot.a, slot.b, slot.scale_var))
    return layer


def refresh_call_signature(layer):
    """Keras reads a layer's `call` signature once, when the layer is made; a layer whose class changed in
    place (to its LoRA class, or back) gets it read again, so that `adapter_ids` reaches the new call."""
    layer._call_signature = inspect.signature(layer.call)  # noqa: SLF001 - what Layer.__init__ sets
    layer.call_signature_parameters = list(layer._call_signature.parameters)  # noqa: SLF001
    layer._call_has_training_arg = "training" in layer.call_signature_parameters  # noqa: SLF001
    layer._call_has_mask_arg = "mask" in layer.call_signature_parameters  # noqa: SLF001
    layer._call_has_context_arg = {  # noqa: SLF001
        arg: arg in layer.call_signature_parameters
        for arg in layer._call_context_args  # noqa: SLF001
    }


def bias_problem(layer, bias):
    """Why `bias` ([out], PEFT's layout) cannot be `layer`'s bias, or None."""
    if getattr(layer, "bias", None) is None:
        return "the layer has no bias"
    if int(np.prod(layer.bias.shape)) != int(np.size(bias)):
        return f"a bias of {np.size(bias)} values, the layer's has {int(np.prod(layer.bias.shape))}"
    return None


def set_bias(layer, bias):
    """Assigns a bias [out] (PEFT's layout) to a Dense or EinsumDense layer (bias axes in kernel order)."""
    layer.bias.assign(np.reshape(np.asarray(bias), layer.bias.shape).astype(layer.bias.dtype))


def forget_traces(model):
    """Drops the functions Keras traced for `model`'s fit, evaluate and predict, which still hold the layers
    as they were before a conversion in place; the next call traces them again."""
    for attr in ("train_function", "test_function", "predict_function"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
