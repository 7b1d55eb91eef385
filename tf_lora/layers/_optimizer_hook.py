"""Routes a Keras optimizer's update of a SparseEmbedding's pulled-rows variable to a push into its table
(and tells the layer of a step the loss scaler skipped).

A Keras optimizer processes the gradients it is given (loss-scale unscaling and the skip of non-finite steps
in LossScaleOptimizer, `loss_scale_factor`, clipping by value, norm or global norm, weight decay) and then,
once per applied step, runs `_backend_update_step(grads, variables, learning_rate)` with the gradients its
rule consumes. A SparseEmbedding's rows live in a table, not in a variable the optimizer could update, so
this module wraps that one method of Keras's TensorFlow optimizer: a variable marked as a table's view of
the step's rows (`mark`) goes to its layer, which pushes the processed gradient into the table with the
table's own optimizer; every other variable goes to Keras's own method, unchanged.

This reaches into Keras's private API: `install` checks that the method is there with the signature this
wraps, and fails loudly otherwise, naming the Keras version.
"""

import inspect
import weakref

import keras
import numpy as np
import tensorflow as tf

_ATTR = "_tf_lora_table_layer"
_installed = False


def mark(variable, layer):
    """Marks `variable` (a keras.Variable) as `layer`'s view of the rows pulled since its last push."""
    setattr(variable, _ATTR, weakref.ref(layer))


def _layer_of(variable):
    """The SparseEmbedding `variable` is the view of (still alive), or None."""
    owner = getattr(variable, _ATTR, None)
    return owner() if owner is not None else None


def install():
    """Wraps TFOptimizer._backend_update_step once per process."""
    global _installed
    if _installed:
        return
    from keras.src.backend.tensorflow import optimizer as tf_optimizer  # noqa: PLC0415 - private, on use

    cls = getattr(tf_optimizer, "TFOptimizer", None)
    original = _method(
        cls,
        "_backend_update_step",
        ["self", "grads", "trainable_variables", "learning_rate"],
        "where tf_lora hands a table's gradients to its push",
    )

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        keep_grads, keep_vars, pushes = [], [], []
        for grad, variable in zip(grads, trainable_variables, strict=True):
            layer = _layer_of(variable)
            if layer is None:
                keep_grads.append(grad)
                keep_vars.append(variable)
            elif grad is not None:
                pushes.append(layer._apply_rows_gradient(grad, self))  # noqa: SLF001 - the layer's half
        # A layer whose rows got no gradient in this step (its output reached no loss, or went through a
        # stop_gradient) is left out by Keras before this method; it starts its list of ids over all the
        # same, as a push would have (a dense Embedding there simply does not train).
        given = {id(variable) for variable in trainable_variables}
        for variable in getattr(self, "_trainable_variables", ()):
            layer = _layer_of(variable)
            if layer is not None and id(variable) not in given:
                layer.forget_step_ids()
        if keep_vars:
            # After the pushes: a push refused (a gradient that is not finite) stops the other variables'
            # updates too, in a graph as eagerly (Keras's weight decay and step count come before and after
            # this method, out of its reach).
            with tf.control_dependencies([p for p in pushes if p is not None]):
                original(self, keep_grads, keep_vars, learning_rate)

    cls._backend_update_step = _backend_update_step
    _small_slots(cls)
    _forget_on_skipped_steps()
    _installed = True


# Optimizer variables Keras keeps for a variable outside its update rule, which a table's view of the rows
# needs at full size: the sum of the micro-batches' gradients (gradient_accumulation_steps) and use_ema's
# average.
_FULL_SIZE = ("gradient_accumulator", "average")


def _method(cls, name, parameters, why):
    """`cls.name`, checked to take `parameters` (a private method of Keras that tf_lora wraps), or an
    ImportError naming the Keras version."""
    method = getattr(cls, name, None)
    if method is None or list(inspect.signature(method).parameters) != parameters:
        raise ImportError(
            f"tf_lora.layers.SparseEmbedding: Keras {keras.__version__} has no "
            f"{getattr(cls, '__name__', cls)}.{name}({', '.join(parameters)}), {why}; use the Keras version "
            "tf_lora was tested with (see requirements.txt)"
        )
    return method


def _small_slots(cls):
    """The slots the update rule keeps for a variable (Adam's momentum and velocity, Adagrad's accumulator...)
    are never used for a table's view of the rows, whose gradient goes to the push: each is made empty
    instead of `max_ids_per_step * dim` zeros, in memory and in every checkpoint and `.keras` file (so a
    checkpoint no longer ties the layer's `max_ids_per_step`). A checkpoint or file written with the full
    zeros loads: the values meant for an empty slot are skipped."""
    original = _method(
        cls,
        "add_variable_from_reference",
        ["self", "reference_variable", "name", "initializer"],
        "where tf_lora keeps the optimizer's unused slots for a table's rows empty",
    )

    def add_variable_from_reference(self, reference_variable, name=None, initializer="zeros"):
        if _layer_of(reference_variable) is None or name in _FULL_SIZE:
            return original(self, reference_variable, name=name, initializer=initializer)
        slot = self.add_variable(
            shape=(0,),
            initializer="zeros",
            dtype=reference_variable.dtype,
            name=f"{reference_variable.path.replace('/', '_')}_{name or 'var'}",
        )
        slot._tf_lora_empty_slot = True  # noqa: SLF001 - read by load_own_variables below
        # An older checkpoint holds this slot at full size: restoring it keeps the empty slot.
        slot._restore_from_tensors = lambda restored_tensors: None  # noqa: SLF001
        return slot

    cls.add_variable_from_reference = add_variable_from_reference

    from keras.src.optimizers import base_optimizer  # noqa: PLC0415 - private, on use

    base = base_optimizer.BaseOptimizer
    load = base.load_own_variables

    def load_own_variables(self, store):
        empty = [str(i) for i, v in enumerate(self.variables) if getattr(v, "_tf_lora_empty_slot", False)]
        if empty:  # an older .keras file holds these slots at full size: keep them empty
            store = {**{key: store[key] for key in store.keys()}, **{key: np.zeros((0,)) for key in empty}}
        load(self, store)

    base.load_own_variables = load_own_variables


def _forget_on_skipped_steps():
    """A step LossScaleOptimizer skips (non-finite gradients) never reaches _backend_update_step: its layers
    are told to start their list of ids over all the same, as an applied step does."""
    from keras.src.optimizers import loss_scale_optimizer  # noqa: PLC0415 - private, on use

    cls = loss_scale_optimizer.LossScaleOptimizer
    original = _method(
        cls, "_stateful_handle_non_finite_grads", ["self"], "where tf_lora learns of a skipped step"
    )

    def _stateful_handle_non_finite_grads(self):
        original(self)
        for variable in self.inner_optimizer._trainable_variables:  # noqa: SLF001 - Keras's own list
            layer = _layer_of(variable)
            if layer is not None:
                layer._step_skipped()  # noqa: SLF001 - the layer's half of this hook

    cls._stateful_handle_non_finite_grads = _stateful_handle_non_finite_grads
