"""tf_lora.layers.SparseEmbedding: a Keras embedding over a tf_lora.SparseTable."""

import contextlib
import contextvars
import dataclasses
import types
import warnings
import weakref

import keras
import numpy as np
import tensorflow as tf

from tf_lora.layers import _optimizer_hook
from tf_lora.sparse import initializers, optimizers
from tf_lora.sparse.sharded_table import ShardedSparseTable
from tf_lora.sparse.table import CONTENTS, SparseTable

_COMBINERS = (None, "sum", "mean", "sqrtn")


@keras.saving.register_keras_serializable(package="tf_lora")
class SparseEmbedding(keras.layers.Layer):
    """Embeds int64 ids from an unbounded space; its table trains on the model optimizer's steps.

    Ids may be a dense tensor (`[batch, ...]`, or `[batch, k]` with a combiner), ragged (`[batch, None]`,
    multi-hot) or a `tf.SparseTensor` (`[batch, k]`, what `tf.io.parse_example` gives for VarLen features),
    ragged and sparse ids with a combiner and optionally per-id `weights` of the same structure. Rows come
    from a `tf_lora.SparseTable`: new ids are inserted while training, and read as zeros otherwise.

    How the table trains: a training call pulls the rows of its ids and adds to them, one row per id read,
    a trainable variable, `pulled_rows` (`[max_ids_per_step, dim]`, always zero), so that the loss's
    gradient with respect to that variable is what `tf.gather` gives a dense embedding: a slice per id
    read. The model's Keras optimizer processes it like any other (unscaled under mixed-precision loss
    scaling, skipped when not finite, clipped by value, norm or global norm) and, when it applies the step,
    hands it to the layer instead of updating the variable (tf_lora wraps Keras's per-step update for
    that), which pushes it into the table with the table's own optimizer. So the rows change exactly when,
    and only when, the optimizer applies gradients (`model.fit`, `optimizer.apply_gradients` / `apply`),
    once per applied step; computing a gradient changes nothing. With `gradient_accumulation_steps`, each
    micro-batch's ids get rows of their own and the applied step pushes the accumulated average. Under a
    tf.distribute strategy each replica keeps its own ids, and one push takes every replica's gradient.

    Args:
      dim: Embedding width, in [1, 2^20].
      combiner: None (output `ids.shape + [dim]`), or 'sum', 'mean', 'sqrtn' over the last axis of the ids
        (output `ids.shape[:-1] + [dim]`: `[batch, dim]` for `[batch, k]` ids; required for ragged and
        sparse ids, which must be `[batch, None]` / `[batch, k]`). One-dimensional ids `[batch]` are one
        id per example: the combiner leaves each row as it is (output `[batch, dim]`).
      initializer: A `tf_lora.sparse_initializers` object, or Keras's Zeros, RandomUniform, RandomNormal or
        TruncatedNormal. Default RandomNormal(stddev=0.05) with a seed of the layer's own (every table
        starts an id with different rows; drawn from Python's `random`, so `keras.utils.set_random_seed`
        makes it reproducible; kept in the layer's config). Processes that build the same model (workers
        of a multi-worker job) need `keras.utils.set_random_seed`, or a seeded initializer, to agree.
      optimizer: The table's optimizer: a `tf_lora.sparse_optimizers` object or Keras's SGD, Adagrad, Adam
        or Ftrl (same hyper-parameters; a learning-rate schedule is taken where Keras takes the model
        optimizer's, at its count of apply calls, per micro-batch under gradient accumulation). Default
        Adagrad(0.05).
      max_ids_per_step: The most ids (repeats counted) the training calls between two applied optimizer
        steps (all micro-batches, with gradient accumulation) may read: the rows of `pulled_rows`
        (`max_ids_per_step * dim` floats, and the model optimizer's slots for it). More is an error naming
        this argument.
      devices: None (one table, where the layer is built), or the devices of a `tf_lora.ShardedSparseTable`
        over which the table's ids are spread, shard `id mod len(devices)` on each (the parameter servers of
        a TensorFlow cluster: `["/job:ps/task:0", "/job:ps/task:1"]`). Kept in the config: a `.keras` file
        written with shards loads with them (the devices must exist); its contents load into any layout,
        as a tf.train.Checkpoint's restore into any layout.

    >>> layer = tf_lora.layers.SparseEmbedding(4, combiner="mean")
    >>> layer(tf.ragged.constant([[1, 2], [3]], dtype=tf.int64)).shape
    TensorShape([2, 4])
    """

    def __init__(
        self,
        dim,
        combiner=None,
        initializer=None,
        optimizer=None,
        max_ids_per_step=65536,
        devices=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        # Its table lives in host memory, which XLA cannot compile: Keras' jit_compile="auto" (XLA on GPUs)
        # then compiles the model without XLA; jit_compile=True is refused with a message (ops.xla).
        self.supports_jit = False
        if combiner not in _COMBINERS:
            raise ValueError(f"SparseEmbedding: combiner must be one of {_COMBINERS}, got {combiner!r}")
        if int(max_ids_per_step) < 1:
            raise ValueError(f"SparseEmbedding: max_ids_per_step must be >= 1, got {max_ids_per_step}")
        self.combiner = combiner
        self.max_ids_per_step = int(max_ids_per_step)
        self.initializer = initializers.resolve(
            initializer, initializers.RandomNormal(stddev=0.05, seed=initializers.new_seed())
        )
        self.table_optimizer = optimizers.resolve(optimizer, optimizers.Adagrad(0.05))
        devices = _devices_here.get((devices,))[0]
        if devices is None:
            self.table = SparseTable(dim, self.initializer, self.table_optimizer, name=self.name)
        else:
            self.table = ShardedSparseTable(
                dim, devices, self.initializer, self.table_optimizer, name=self.name
            )
        self.dim = self.table.dim
        self.devices = self.table.devices if devices is not None else None
        _optimizer_hook.install()
        self.pulled_rows = self.add_weight(
            shape=(self.max_ids_per_step, self.dim), initializer="zeros", trainable=True, name="pulled_rows"
        )
        _optimizer_hook.mark(self.pulled_rows, self)
        # Always zero: a checkpoint restores none of it, so one written with another max_ids_per_step (its
        # shape) restores into this layer too.
        self.pulled_rows._restore_from_tensors = lambda restored_tensors: None  # noqa: SLF001
        # The ids read by training calls since the last optimizer step, in pulled_rows' order: per replica
        # under a tf.distribute strategy (each replica reads its own ids), never saved.
        # They are the current step's bookkeeping, not the layer's state: held where neither Keras nor
        # tf.train.Checkpoint / SavedModel track them. `fresh` is 1 once a step was applied (or skipped by
        # the loss scaler): the next training call starts the list over, while the records stay readable
        # for a second apply of a gradient computed before.
        local = {
            "trainable": False,
            "synchronization": tf.VariableSynchronization.ON_READ,
            "aggregation": tf.VariableAggregation.NONE,
        }
        self._step = types.SimpleNamespace(
            ids=tf.Variable(tf.zeros([self.max_ids_per_step], tf.int64), name="step_ids", **local),
            count=tf.Variable(0, dtype=tf.int32, name="step_count", **local),
            fresh=tf.Variable(1, dtype=tf.int32, name="step_fresh", **local),
        )
        # Checkpoints carry the list (its used part): one taken between the micro-batches of an accumulated
        # step holds their summed gradient in the model optimizer, by position, and the ids they belong to.
        self._step_state = _StepState(self)

    def call(self, ids, weights=None, training=None):
        if isinstance(ids, tf.SparseTensor | tf.RaggedTensor):
            flat, segments, rows, weights = _segments(ids, weights)
        else:
            flat, segments, rows = ids, None, None
        flat = _int64(flat)
        # A frozen layer (trainable=False) reads its table as in inference: its rows never change.
        values = self._pull_for_training(flat) if training and self.trainable else self.table.pull(flat)
        if segments is not None:
            if self.combiner is None:
                raise ValueError(
                    "SparseEmbedding: ragged and sparse ids need a combiner ('sum', 'mean' or 'sqrtn')"
                )
            return _combine(values, segments, rows, weights, self.combiner)
        if weights is not None:
            raise ValueError("SparseEmbedding: weights go with ragged or sparse ids")
        if self.combiner is None or ids.shape.rank in (0, 1):  # one id per example: nothing to combine
            return values
        if ids.shape.rank is None:
            raise ValueError("SparseEmbedding: dense ids with a combiner need a known rank")
        total = tf.reduce_sum(values, axis=-2)
        count = tf.cast(tf.shape(ids)[-1], values.dtype)
        if self.combiner == "sum":
            return total
        if self.combiner == "mean":
            return tf.math.divide_no_nan(total, count)
        return tf.math.divide_no_nan(total, tf.sqrt(count))

    def _pull_for_training(self, flat):
        """The rows of `flat` (inserting new ids), as a view whose gradient reaches pulled_rows: row i of the
        ids read since the last applied step is pulled_rows[i].

        Under ParameterServerStrategy the layer's list of those ids (its variables: one copy on the parameter
        servers, shared by every worker) is not used: workers running steps at once overwrote each other's
        list and pushed gradients into the wrong ids. There the ids read stay tensors of the traced step,
        counted from 0 in it, which the optimizer's step in the same function pushes (_apply_rows_gradient).
        """
        ids = tf.reshape(flat, [-1])
        if _parameter_servers():
            reads = _reads_of_step(
                self,
                "SparseEmbedding {}: under ParameterServerStrategy, training calls run in "
                "a tf.function (the function the ClusterCoordinator schedules)",
            )
            start = tf.add_n([tf.size(read()) for read in reads]) if reads else tf.constant(0)
            positions = self._positions(start, ids, "in this step than max_ids_per_step={}: raise it")
            reads.append(weakref.ref(ids))  # its graph holds it (held strongly, it would hold the graph)
        else:
            step = self._step
            start = tf.where(tf.convert_to_tensor(step.fresh) > 0, 0, tf.convert_to_tensor(step.count))
            positions = self._positions(
                start,
                ids,
                "since the last optimizer step than max_ids_per_step={}: raise it (training calls whose "
                "gradients are never applied count too: call with training=False, or forget_step_ids())",
            )
            if _replicas() > 1:  # a replica's own copy, which takes whole assignments only
                step.ids.assign(tf.tensor_scatter_nd_update(step.ids.read_value(), positions[:, None], ids))
            else:
                step.ids.scatter_nd_update(positions[:, None], ids)
            # Only once the ids exist: in a tf.function, an assign that does not depend on them runs even
            # when reading them fails (an exhausted iterator at the end of an epoch of unknown length), and
            # the step would forget that it had been applied.
            with tf.control_dependencies([positions, ids]):
                step.count.assign(start + tf.size(ids))
                step.fresh.assign(0)
        # Each id read has its own row of pulled_rows (zero) beside the table's; the push sums the
        # gradients of repeated ids. pulled_rows may read as the compute dtype under mixed precision; the
        # rows stay float32.
        rows = self.table.pull(ids, training=True) + tf.cast(
            tf.gather(self.pulled_rows, positions), tf.float32
        )
        return tf.reshape(rows, tf.concat([tf.shape(flat), [self.dim]], axis=0))

    def _positions(self, start, ids, too_many):
        """The rows of pulled_rows for `ids` read after `start` others; `too_many` ("... {}") is the error
        when they pass max_ids_per_step."""
        end = start + tf.size(ids)
        fits = tf.debugging.assert_less_equal(
            end,
            self.max_ids_per_step,
            message=f"SparseEmbedding {self.name}: more ids were read for training "
            + too_many.format(self.max_ids_per_step),
        )
        with tf.control_dependencies([fits]):
            return tf.range(start, end)

    def _apply_rows_gradient(self, grad, optimizer):
        """The model optimizer applies a step: push the processed gradient of the rows pulled since the last
        one into the table, then start over (called by _optimizer_hook)."""
        _warn_unreached(self, optimizer)
        in_step = _parameter_servers()
        if in_step:
            if getattr(optimizer, "gradient_accumulation_steps", None):
                raise ValueError(
                    f"SparseEmbedding {self.name}: gradient_accumulation_steps is not supported under "
                    "ParameterServerStrategy (each step pushes the ids its own training calls read)"
                )
            reads = _reads_of_step(
                self,
                "SparseEmbedding {}: under ParameterServerStrategy, the optimizer step runs in the "
                "tf.function of the training calls it applies (one scheduled step: forward, gradient, apply)",
            )
            if not reads:
                raise ValueError(
                    f"SparseEmbedding {self.name}: under ParameterServerStrategy, the optimizer step must "
                    "run in the same tf.function as the training calls it applies (one scheduled step: "
                    "forward, gradient, apply); this function read no ids for training"
                )
            ids = tf.concat([read() for read in reads], 0)
            del reads[:]  # the next step in this function (steps_per_execution) starts its own list
            count = tf.size(ids)
        else:
            count = tf.convert_to_tensor(self._step.count)
            ids = tf.convert_to_tensor(self._step.ids)[:count]
        if isinstance(grad, tf.IndexedSlices):
            rows = tf.math.unsorted_segment_sum(grad.values, grad.indices, count)
        else:
            rows = tf.convert_to_tensor(grad)[:count]
        rows = tf.cast(rows, tf.float32)
        # Rows whose gradient is exactly zero are left alone (the table's optimizers are lazy, as sparse
        # updates are): among them the rows of training calls whose loss was never applied (a step the
        # loss scaler skipped, a forward pass that was not trained on), which are still in the list.
        touched = tf.reduce_any(tf.not_equal(rows, 0), axis=1)
        ids, rows = tf.boolean_mask(ids, touched), tf.boolean_mask(rows, touched)
        finite = tf.debugging.Assert(
            tf.reduce_all(tf.math.is_finite(rows)),
            [
                f"SparseEmbedding {self.name!r}: the model optimizer's gradient of the rows read is not "
                "finite (NaN or Inf): nothing was pushed into the table, nor applied to the variables Keras "
                "updates with it (its weight decay and step count may have moved). A LossScaleOptimizer "
                "(mixed precision's) skips such steps whole."
            ],
        )
        ids, rows = _after(finite, ids), _after(finite, rows)

        def push(ids, rows):
            # Keras takes its own schedule at the count of apply calls (_iterations), which gradient
            # accumulation counts per micro-batch (`iterations` is per applied step): the same here.
            lr = self.table_optimizer.learning_rate_at(
                getattr(optimizer, "_iterations", optimizer.iterations)
            )
            return self.table.push_step(ids, rows, lr)

        context = tf.distribute.get_replica_context()
        if _replicas() > 1 and context is not None:
            # Each replica holds its own ids and their gradient (taken out before Keras sums the variables'
            # gradients across replicas): all of them go into one push, which sums the repeats, so every
            # replica's gradient counts once, as the all-reduce counts it for a dense variable.
            def push_all(strategy, ids, rows):
                every = strategy.experimental_local_results
                return push(tf.concat(every(ids), 0), tf.concat(every(rows), 0))

            step = context.merge_call(push_all, args=(ids, rows))
        else:
            step = push(ids, rows)
        if in_step:
            return step
        with tf.control_dependencies([step]):
            return self._step.fresh.assign(1)

    def _step_skipped(self):
        """The loss scaler skipped the step (called by _optimizer_hook): the list starts over, as after a
        push. Under ParameterServerStrategy the step's reads are its traced function's and end with it (the
        skipping branch may be traced before the applying one, which still needs them)."""
        if not _parameter_servers():
            self.forget_step_ids()

    def forget_step_ids(self):
        """Starts the list of ids read for training over, as an applied step does: for training calls whose
        gradients will never be applied (e.g. Monte Carlo dropout). Called by tf_lora when the loss scaler
        skips a step."""
        if _parameter_servers() and not tf.executing_eagerly():
            del _reads_of_step(self, "")[:]
            return None
        fresh = self._step.fresh
        if isinstance(fresh, tf.distribute.DistributedValues) and tf.distribute.in_cross_replica_context():
            # Each replica's own (the loss scaler's skipping branch runs in cross-replica context, where an
            # assignment to a variable of no aggregation failed): mixed precision on several GPUs.
            return tf.group([component.assign(1) for component in fresh.values])
        return fresh.assign(1)

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        children = super()._trackable_children(save_type, **kwargs)
        if save_type == "savedmodel":
            # A SavedModel serves: it does not resume between micro-batches, and its functions cannot reach
            # the list's variables (held apart from what TensorFlow tracks). Left in, tf.saved_model.save
            # failed, and a loaded model could not be saved again.
            children.pop("_step_state", None)
        return children

    def compute_output_shape(self, input_shape):
        if self.combiner is None or len(input_shape) <= 1:
            return tuple(input_shape) + (self.dim,)
        return tuple(input_shape[:-1]) + (self.dim,)

    # The table's contents travel with the layer in .keras files (pulled_rows is always zero, and the step's
    # ids are the current step's only: neither is saved).
    def save_own_variables(self, store):
        contents = self.table.export()
        for name in CONTENTS:
            store[f"table_{name}"] = np.asarray(contents[name])
        for name, value in self._step_state.values().items():
            store[f"step_{name}"] = np.asarray(value)

    def load_own_variables(self, store):
        step = {name: np.asarray(store[f"step_{name}"]) for name in _STEP if f"step_{name}" in store}
        self._step_state.check(step)
        self.table.import_({name: np.asarray(store[f"table_{name}"]) for name in CONTENTS})
        self._step_state.assign(step)

    def get_config(self):
        config = super().get_config()
        config.update(
            dim=self.dim,
            combiner=self.combiner,
            initializer=_serialize(self.initializer),
            optimizer=_serialize(self.table_optimizer),
            max_ids_per_step=self.max_ids_per_step,
            devices=self.devices,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["initializer"] = _deserialize(config["initializer"], initializers)
        config["optimizer"] = _deserialize(config["optimizer"], optimizers)
        return cls(**config)


# (devices,) that sparse_table_devices places the tables of the layers made in its block on, whatever they
# ask; unset outside.
_devices_here = contextvars.ContextVar("tf_lora_sparse_table_devices")


@contextlib.contextmanager
def sparse_table_devices(devices):
    """Places the tables of the SparseEmbedding layers made inside the block on `devices` (a list of devices,
    as the layer's `devices` argument), or on this machine (`None`), whatever their arguments or config ask:
    to load a `.keras` file trained on parameter servers where they are not (serving, evaluation, a laptop),
    or onto another cluster's. The tables' contents load into any layout.

    >>> with tf_lora.layers.sparse_table_devices(None):  # e.g. around keras.models.load_model(path)
    ...     layer = tf_lora.layers.SparseEmbedding(4, devices=["/job:ps/task:0", "/job:ps/task:1"])
    >>> print(layer.devices)
    None
    """
    if devices is not None and (isinstance(devices, str) or not isinstance(devices, list | tuple)):
        raise ValueError(f"sparse_table_devices: devices must be a list of devices or None, got {devices!r}")
    token = _devices_here.set((None if devices is None else list(devices),))
    try:
        yield
    finally:
        _devices_here.reset(token)


_STEP = ("ids", "count", "fresh")


class _StepState(tf.__internal__.tracking.Trackable):
    """A SparseEmbedding's list of the ids read for training since the last applied step, as checkpoint
    state: the used part of the list, its count and `fresh`. Under a strategy of several replicas each keeps
    its own list, which is not saved (a checkpoint taken between accumulated micro-batches there resumes as
    an older file does: the list starts over)."""

    def __init__(self, layer):
        self._layer = layer

    def _kept(self):
        """The layer's list, or None under several replicas (each replica's own, not saved)."""
        step = self._layer._step  # noqa: SLF001 - the layer's own bookkeeping
        per_replica = _replicas() > 1 or isinstance(step.count, tf.distribute.DistributedValues)
        return None if per_replica else step

    def values(self):
        """{"ids", "count", "fresh"} now, or {} under several replicas."""
        step = self._kept()
        if step is None:
            return {}
        count = tf.convert_to_tensor(step.count)
        return {
            "ids": tf.convert_to_tensor(step.ids)[:count],
            "count": count,
            "fresh": tf.convert_to_tensor(step.fresh),
        }

    def check(self, values):
        if "ids" in values and int(np.size(values["ids"])) > self._layer.max_ids_per_step:
            raise ValueError(
                f"SparseEmbedding {self._layer.name}: the saved step holds {int(np.size(values['ids']))} ids "
                f"read for training, more than max_ids_per_step={self._layer.max_ids_per_step}: rebuild the "
                "layer with at least that many"
            )

    def assign(self, values):
        step = self._kept()
        if not values or step is None:
            return
        ids = np.asarray(values["ids"], np.int64)
        step.ids.assign(np.concatenate([ids, np.zeros(self._layer.max_ids_per_step - len(ids), np.int64)]))
        step.count.assign(int(values["count"]))
        step.fresh.assign(int(values["fresh"]))

    def _serialize_to_tensors(self):
        return self.values()

    def _restore_from_tensors(self, restored_tensors):
        if not tf.executing_eagerly():  # a graph-mode restore (TF1 sessions): the list starts over
            return None
        values = {name: np.asarray(tensor) for name, tensor in restored_tensors.items()}
        self.check(values)
        self.assign(values)


def _after(op, tensor):
    """`tensor`, read once `op` ran (in a graph; eagerly it already has)."""
    with tf.control_dependencies([op]):
        return tf.identity(tensor)


def _parameter_servers():
    """Whether the layer runs under ParameterServerStrategy (its steps may run on several workers at once)."""
    return tf.distribute.has_strategy() and isinstance(
        tf.distribute.get_strategy(), tf.distribute.ParameterServerStrategy
    )


# {outermost function graph: {(id(layer), replica): [weak references to the id tensors read for training]}},
# kept while the graph lives. By replica: the replicas of a worker with several devices are traced in one
# graph, each with its forward and its apply.
_READS = weakref.WeakKeyDictionary()


def _reads_of_step(layer, eager_message):
    """The list of id tensors `layer`'s training calls read in the tf.function being traced (kept on its
    outermost function graph, so that an apply in a branch, e.g. the loss scaler's, finds them); raises
    `eager_message` eagerly."""
    if tf.executing_eagerly():
        raise RuntimeError(eager_message.format(layer.name))
    graph = tf.compat.v1.get_default_graph()
    while hasattr(getattr(graph, "outer_graph", None), "outer_graph"):  # a function graph within another
        graph = graph.outer_graph
    return _READS.setdefault(graph, {}).setdefault((id(layer), _replica_id()), [])


def _replica_id():
    """The replica being traced (0 in cross-replica context, where a loss scaler may apply a step)."""
    context = tf.distribute.get_replica_context()
    replica = None if context is None else tf.get_static_value(context.replica_id_in_sync_group)
    return 0 if replica is None else int(replica)


def _replicas():
    return tf.distribute.get_strategy().num_replicas_in_sync


def _int64(ids):
    if ids.dtype != tf.int64:
        if not ids.dtype.is_integer:
            raise TypeError(f"SparseEmbedding: ids must be integers, got {ids.dtype.name}")
        ids = tf.cast(ids, tf.int64)
    return ids


def _segments(ids, weights):
    """Ragged ids `[batch, None]` or sparse ids `[batch, k]` as (flat ids, each one's example, examples,
    flat weights); anything else, or weights of another structure, is an error that says so."""
    what = "ragged" if isinstance(ids, tf.RaggedTensor) else "sparse"
    if isinstance(ids, tf.RaggedTensor):
        if ids.ragged_rank != 1 or ids.flat_values.shape.rank != 1:
            raise ValueError(
                f"SparseEmbedding: ragged ids must be [batch, None] (ragged_rank 1); got {ids.shape} with "
                f"ragged_rank {ids.ragged_rank}: give each example's ids as one list"
            )
        flat, segments, rows, structure = ids.flat_values, ids.value_rowids(), ids.nrows(), ids.row_splits
    else:
        if ids.shape.rank != 2:
            raise ValueError(
                f"SparseEmbedding: sparse ids must be [batch, k] (rank 2); got shape {ids.shape}"
            )
        flat, segments, rows, structure = ids.values, ids.indices[:, 0], ids.dense_shape[0], ids.indices
    if weights is None:
        return flat, segments, rows, None
    kind = tf.RaggedTensor if what == "ragged" else tf.SparseTensor
    if not isinstance(weights, kind) or (
        what == "ragged" and (weights.ragged_rank != 1 or weights.flat_values.shape.rank != 1)
    ):
        raise ValueError(
            f"SparseEmbedding: weights must be {what} like the ids (one weight per id); got "
            f"{type(weights).__name__}"
        )
    if what == "ragged":
        weights_flat, weights_structure = weights.flat_values, weights.row_splits
    else:
        weights_flat, weights_structure = weights.values, weights.indices
    message = f"SparseEmbedding: {what} weights must have the ids' structure (one weight per id)"
    if weights_structure.shape.is_fully_defined() and structure.shape.is_fully_defined():
        if weights_structure.shape != structure.shape:
            raise ValueError(message)
    check = tf.debugging.assert_equal(
        tf.shape(weights_structure, out_type=tf.int64),
        tf.shape(structure, out_type=tf.int64),
        message=message,
    )
    with tf.control_dependencies([check]):
        same = tf.reduce_all(tf.equal(tf.cast(weights_structure, tf.int64), tf.cast(structure, tf.int64)))
    check = tf.debugging.assert_equal(same, True, message=message)
    with tf.control_dependencies([check]):
        return flat, segments, rows, tf.identity(weights_flat)


def _combine(values, segments, rows, weights, combiner):
    """Combines the rows of each example (segment), weighted, as tf.nn.safe_embedding_lookup_sparse does:
    'mean' divides by the sum of the weights, 'sqrtn' by the root of the sum of their squares; an example
    with no ids gives zeros."""
    segments = tf.cast(segments, tf.int32)
    rows = tf.cast(rows, tf.int32)
    if weights is None:
        weights = tf.ones(tf.shape(values)[:1], values.dtype)
    weights = tf.cast(weights, values.dtype)
    total = tf.math.unsorted_segment_sum(values * weights[:, None], segments, rows)
    if combiner == "sum":
        return total
    if combiner == "mean":
        norm = tf.math.unsorted_segment_sum(weights, segments, rows)
    else:
        norm = tf.sqrt(tf.math.unsorted_segment_sum(weights * weights, segments, rows))
    return tf.math.divide_no_nan(total, norm[:, None])


def _serialize(obj):
    fields = {}
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if isinstance(value, keras.optimizers.schedules.LearningRateSchedule):
            fields[field.name] = {"schedule": keras.saving.serialize_keras_object(value)}
        else:
            fields[field.name] = value if isinstance(value, int | float) else float(np.asarray(value))
    return {"class_name": type(obj).__name__, "config": fields}


def _deserialize(config, module):
    fields = {
        k: keras.saving.deserialize_keras_object(v["schedule"]) if isinstance(v, dict) else v
        for k, v in config["config"].items()
    }
    return getattr(module, config["class_name"])(**fields)


def _warn_unreached(layer, optimizer):
    """Warns (once per layer and optimizer) of what the model optimizer does to its variables that the
    table's rows never get: decoupled weight decay (Keras decays every row of a dense Embedding at every
    step; a table's rows change only when pushed) and the moving average of `use_ema`."""
    missed = []
    if getattr(optimizer, "weight_decay", None) and optimizer._use_weight_decay(layer.pulled_rows):  # noqa: SLF001
        missed.append(f"weight_decay={optimizer.weight_decay}")
    if getattr(optimizer, "use_ema", False):
        missed.append("use_ema=True (an exponential moving average of the weights)")
    seen = layer.__dict__.setdefault("_tf_lora_warned", set())
    if missed and id(optimizer) not in seen:
        seen.add(id(optimizer))
        warnings.warn(
            f"SparseEmbedding {layer.name!r}: the model optimizer's {' and '.join(missed)} does not reach "
            "the table's rows (they change only when pushed, by the table's own optimizer): regularize the "
            "table through its optimizer (e.g. sparse_optimizers.Ftrl's l2_regularization_strength), or "
            "leave the layer out of the decay "
            "(optimizer.exclude_from_weight_decay(var_names=['pulled_rows']))",
            stacklevel=2,
        )
