"""tf_lora.layers.SparseEmbedding: a Keras embedding over a tf_lora.SparseTable."""

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from tf_lora.python.ops import sparse_table_ops
from tf_lora.sparse import initializers, optimizers
from tf_lora.sparse.table import SparseTable

_COMBINERS = (None, "sum", "mean", "sqrtn")
_CONTENTS = ("keys", "values", "slots", "update_counts", "last_steps", "step")


@keras.saving.register_keras_serializable(package="tf_lora")
class SparseEmbedding(keras.layers.Layer):
    """Embeds int64 ids from an unbounded space; its table trains itself inside `model.fit`.

    Ids may be a dense tensor (`[batch, ...]`, or `[batch, k]` with a combiner) or ragged (`[batch, None]`,
    multi-hot, with a combiner). Rows come from a `tf_lora.SparseTable`: new ids are inserted while
    training, and read as zeros otherwise.

    How the table trains with no push in user code: the layer owns one trainable scalar, `anchor`, that
    the output does not depend on, and pulls its rows through a `tf.custom_gradient` declared as a function
    of `anchor`. Keras differentiates its trainable weights, so backpropagation reaches the pull; the
    gradient function pushes the rows' gradient into the table (with the table's own optimizer and
    learning rate) and returns a zero gradient for `anchor` computed from the push's output, so that the
    push runs wherever Keras uses that gradient, eagerly or compiled. The dense layers of the model train
    with any Keras optimizer.

    Args:
      dim: Embedding width.
      combiner: None (output `ids.shape + [dim]`), or 'sum', 'mean', 'sqrtn' over the last axis of the ids
        (output `[batch, dim]`; required for ragged ids).
      initializer: A `tf_lora.sparse_initializers` object.
      optimizer: A `tf_lora.sparse_optimizers` object (the table's optimizer; default Adagrad(0.05)).

    >>> layer = tf_lora.layers.SparseEmbedding(4, combiner="mean")
    >>> layer(tf.ragged.constant([[1, 2], [3]], dtype=tf.int64)).shape
    TensorShape([2, 4])
    """

    def __init__(self, dim, combiner=None, initializer=None, optimizer=None, **kwargs):
        super().__init__(**kwargs)
        if combiner not in _COMBINERS:
            raise ValueError(f"SparseEmbedding: combiner must be one of {_COMBINERS}, got {combiner!r}")
        self.dim = int(dim)
        self.combiner = combiner
        self.initializer = initializer or initializers.RandomNormal(stddev=0.05)
        self.table_optimizer = optimizer or optimizers.Adagrad(0.05)
        self.table = SparseTable(self.dim, self.initializer, self.table_optimizer, name=self.name)
        self.anchor = self.add_weight(shape=(), initializer="zeros", trainable=True, name="anchor")

    def call(self, ids, training=None):
        ragged = isinstance(ids, tf.RaggedTensor)
        flat = ids.flat_values if ragged else ids
        if flat.dtype != tf.int64:
            flat = tf.cast(flat, tf.int64) if flat.dtype.is_integer else flat
        if flat.dtype != tf.int64:
            raise TypeError(f"SparseEmbedding: ids must be integers, got {flat.dtype.name}")
        values = self._pull_and_push(flat) if training else self.table.pull(flat)
        if ragged:
            if self.combiner is None:
                raise ValueError("SparseEmbedding: ragged ids need a combiner ('sum', 'mean' or 'sqrtn')")
            values = tf.RaggedTensor.from_row_splits(values, ids.row_splits)
            total = tf.reduce_sum(values, axis=1)
            count = tf.cast(ids.row_lengths(), values.dtype)[:, None]
        elif self.combiner is None:
            return values
        else:
            total = tf.reduce_sum(values, axis=-2)
            count = tf.cast(tf.shape(ids)[-1], values.dtype)
        if self.combiner == "sum":
            return total
        if self.combiner == "mean":
            return tf.math.divide_no_nan(total, count)
        return tf.math.divide_no_nan(total, tf.sqrt(count))

    def _pull_and_push(self, ids):
        table = self.table

        @tf.custom_gradient
        def pull(anchor):
            values = table.pull(ids, training=True)

            def push(dvalues):
                lr = tf.cast(tf.convert_to_tensor(table.optimizer.learning_rate), tf.float32)
                step = sparse_table_ops.push(table.resource_handle, ids, tf.convert_to_tensor(dvalues), lr)
                # Zero (the step is >= 1), but computed from the push's output: a data dependency that
                # makes the push run wherever the anchor's gradient is used. A control dependency on a
                # constant zero is not enough: graph rewriting inside Keras's Adam update dropped it.
                return tf.cast(tf.minimum(step, 0), anchor.dtype)

            return values, push

        return pull(tf.convert_to_tensor(self.anchor))

    def compute_output_shape(self, input_shape):
        if self.combiner is None:
            return tuple(input_shape) + (self.dim,)
        return (input_shape[0], self.dim)

    # The table's contents travel with the layer's variables in .keras files.
    def save_own_variables(self, store):
        store["0"] = self.anchor
        contents = self.table.export()
        for name in _CONTENTS:
            store[f"table_{name}"] = np.asarray(contents[name])

    def load_own_variables(self, store):
        self.anchor.assign(store["0"])
        self.table.import_({name: np.asarray(store[f"table_{name}"]) for name in _CONTENTS})

    def get_config(self):
        config = super().get_config()
        config.update(
            dim=self.dim,
            combiner=self.combiner,
            initializer=_serialize(self.initializer),
            optimizer=_serialize(self.table_optimizer),
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["initializer"] = _deserialize(config["initializer"], initializers)
        config["optimizer"] = _deserialize(config["optimizer"], optimizers)
        return cls(**config)


def _serialize(obj):
    fields = {}
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        fields[field.name] = value if isinstance(value, int | float) else float(np.asarray(value))
    return {"class_name": type(obj).__name__, "config": fields}


def _deserialize(config, module):
    return getattr(module, config["class_name"])(**config["config"])
