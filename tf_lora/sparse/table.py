"""tf_lora.SparseTable: an embedding table over an unbounded int64 id space."""

import itertools
import numbers

import tensorflow as tf

from tf_lora.python.ops import sparse_table_ops
from tf_lora.sparse import initializers, optimizers, resharding

_table_ids = itertools.count()

# What export() gives and import_() takes.
CONTENTS = ("keys", "values", "slots", "update_counts", "last_steps", "step")

# The widest row the op library takes (sparse::Config::kMaxDim): 2^20 values, 12 MiB a row with Adam's slots.
MAX_DIM = 1 << 20


class SparseTable(resharding.GathersShards, tf.saved_model.experimental.TrackableResource):
    """int64 ids -> float32 rows of `dim` that grow as ids arrive, trained by `push`.

    Rows live in sharded, lock-striped storage inside the op library. A new id's row comes from
    `initializer` as a pure function of (seed, id), so arrival order never changes it. `push` applies the
    table's optimizer to the rows of the ids pushed (gradients of duplicate ids summed first).

    Args:
      dim: Row width, in [1, 2^20].
      initializer: A `tf_lora.sparse_initializers` object (default `Zeros()`).
      optimizer: A `tf_lora.sparse_optimizers` object (default `SGD(0.01)`).
      name: Name of the table.

    >>> table = tf_lora.SparseTable(4, optimizer=tf_lora.sparse_optimizers.SGD(0.5))
    >>> table.pull([7, 42], training=True).shape
    TensorShape([2, 4])
    >>> table.push([7], tf.ones([1, 4]))
    >>> table.pull([7]).numpy()
    array([[-0.5, -0.5, -0.5, -0.5]], dtype=float32)
    """

    def __init__(self, dim, initializer=None, optimizer=None, name="sparse_table"):
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
            raise TypeError(f"SparseTable: dim must be an integer, got {dim!r}")
        if not 1 <= int(dim) <= MAX_DIM:
            raise ValueError(f"SparseTable: dim must be in [1, {MAX_DIM}] (2^20), got {dim}")
        self._dim = int(dim)
        self._initializer = initializers.resolve(initializer, initializers.Zeros())
        self._optimizer = optimizers.resolve(optimizer, optimizers.SGD())
        self._name = name
        self._shared_name = f"tf_lora_{name}_{next(_table_ids)}"
        # The object that created the table frees it when it goes (copies, such as the one SavedModel export
        # makes, never do). By id: the garbage collector clears weak references before it runs __del__.
        self._creator_id = id(self)
        super().__init__()
        # Create the table now, outside any tf.function being traced (as TensorFlow's lookup tables do):
        # a handle made while tracing would belong to that function's graph.
        with tf.init_scope():
            self.resource_handle  # noqa: B018 - creates the resource

    @property
    def name(self) -> str:
        return self._name

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def optimizer(self):
        return self._optimizer

    def _create_resource(self):
        return sparse_table_ops.create(
            dim=self._dim,
            shared_name=self._shared_name,
            **self._initializer.attrs(),
            **self._optimizer.attrs(),
        )

    def _destroy_resource(self):
        """Frees the table's memory when the SparseTable that created it is deleted (eagerly; TensorFlow
        calls this from `__del__`): a function traced with its handle fails from then on, as one holding a
        deleted variable does. Tables of a loaded SavedModel stay while the process runs."""
        handle = self._resource_handle
        if (
            tf.executing_eagerly()
            and getattr(self, "_creator_id", None) == id(self)
            and isinstance(handle, tf.__internal__.EagerTensor)
        ):
            tf.raw_ops.DestroyResourceOp(resource=handle, ignore_lookup_error=True)

    def pull(self, ids, training=False) -> tf.Tensor:
        """The rows of `ids` (int64, any shape): `ids.shape + [dim]`.

        With `training=True` ids not yet in the table are inserted with their initial rows; otherwise they
        read as zeros and the table is unchanged.
        """
        ids = int64_ids(ids, "pull")
        return sparse_table_ops.pull(self.resource_handle, ids, dim=self._dim, training=bool(training))

    def push(self, ids, grads, learning_rate=None):
        """Applies the optimizer to the rows of `ids` with `grads` (`ids.shape + [dim]`, float32)."""
        step = self.push_step(ids, grads, learning_rate)
        return None if tf.inside_function() or tf.executing_eagerly() else step.op

    def push_step(self, ids, grads, learning_rate=None) -> tf.Tensor:
        """`push`, returning the table's step after it (int64: what control dependencies wait on)."""
        ids = int64_ids(ids, "push")
        grads = tf.convert_to_tensor(grads, dtype=tf.float32)
        return sparse_table_ops.push(self.resource_handle, ids, grads, self.learning_rate(learning_rate))

    def learning_rate(self, learning_rate=None) -> tf.Tensor:
        """The float32 learning rate a push takes: `learning_rate`, or the optimizer's when None (a schedule
        needs a step, so it must be given)."""
        if learning_rate is None:
            learning_rate = self._optimizer.learning_rate
            if isinstance(learning_rate, optimizers.LearningRateSchedule):
                raise ValueError(
                    "SparseTable.push: the table's learning rate is a schedule, which needs a step: pass "
                    "learning_rate= (or train through tf_lora.layers.SparseEmbedding, which follows the "
                    "model optimizer's step)"
                )
        return tf.cast(tf.convert_to_tensor(learning_rate), tf.float32)

    def remove(self, ids) -> tf.Tensor:
        """Removes `ids` (int64; ids not in the table are ignored). Returns how many were removed."""
        return sparse_table_ops.remove(self.resource_handle, int64_ids(ids, "remove"))

    def evict(self, min_update_count=0, max_age=None) -> tf.Tensor:
        """Removes rarely or long-ago updated ids, the memory bound CTR systems run with.

        Args:
          min_update_count: Ids pushed fewer times than this are removed.
          max_age: When given, ids last pushed more than `max_age` pushes ago are removed too.

        Returns:
          How many ids were removed.
        """
        if max_age is None:
            max_age = -1  # the kernel's "no age limit"
        elif not isinstance(max_age, tf.Tensor) and max_age < 0:
            raise ValueError(f"SparseTable.evict: max_age must be >= 0 or None, got {max_age}")
        return sparse_table_ops.evict(
            self.resource_handle,
            tf.convert_to_tensor(min_update_count, tf.int64),
            tf.convert_to_tensor(max_age, tf.int64),
        )

    def size(self) -> tf.Tensor:
        """The number of ids in the table (int64 scalar)."""
        return sparse_table_ops.size(self.resource_handle)

    def export(self) -> dict:
        """Every id with its values, optimizer slots, update count and last step, and the table's step."""
        keys, values, slots, counts, last_steps, step = sparse_table_ops.export(self.resource_handle)
        return {
            "keys": keys,
            "values": values,
            "slots": slots,
            "update_counts": counts,
            "last_steps": last_steps,
            "step": step,
        }

    # Checkpointing (tf.train.Checkpoint, and SavedModel's variables): every key with its values, slots
    # and metadata, and the table's step, as TensorFlow's MutableHashTable does it. A ShardedSparseTable's
    # checkpoint restores here too (its shards gathered), and this one into it (resharding).
    def _serialize_to_tensors(self):
        return self.export()

    def _restore_from_tensors(self, restored_tensors):
        return resharding.restore_contents(self, restored_tensors)

    def import_(self, contents: dict):
        """Replaces the table's contents with an `export()`; bad input leaves the table as it was."""
        missing = set(CONTENTS) - set(contents)
        if missing:
            raise ValueError(f"SparseTable.import_: missing {sorted(missing)}")
        try:
            return sparse_table_ops.import_(
                self.resource_handle,
                tf.convert_to_tensor(contents["keys"], tf.int64),
                tf.convert_to_tensor(contents["values"], tf.float32),
                tf.convert_to_tensor(contents["slots"], tf.float32),
                tf.convert_to_tensor(contents["update_counts"], tf.int64),
                tf.convert_to_tensor(contents["last_steps"], tf.int64),
                tf.convert_to_tensor(contents["step"], tf.int64),
            )
        except tf.errors.InvalidArgumentError as e:  # eagerly: say which table (a restore reads many)
            raise tf.errors.InvalidArgumentError(
                e.node_def, e.op, f"SparseTable {self.name!r}: {e.message}"
            ) from None


def int64_ids(ids, method):
    """`ids` as an int64 tensor; other dtypes are an error naming `method` ("pull", or "Class.method")."""
    ids = tf.convert_to_tensor(ids, dtype_hint=tf.int64)
    if ids.dtype != tf.int64:
        where = method if "." in method else f"SparseTable.{method}"
        raise TypeError(f"{where}: ids must be int64, got {ids.dtype.name}")
    return ids
