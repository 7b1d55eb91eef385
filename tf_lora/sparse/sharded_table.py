"""tf_lora.ShardedSparseTable: one table's ids spread over several devices (parameter servers of a TensorFlow
cluster), with SparseTable's contract."""

import numbers

import tensorflow as tf

from tf_lora.sparse import initializers, optimizers, resharding
from tf_lora.sparse.table import CONTENTS, SparseTable, int64_ids

# Where the worker partitions ids, sums repeated ids' gradients and stitches rows back: its host, so that
# sums keep the table's order (a GPU's segment sums add in no fixed order).
_HOST = "/device:CPU:0"


class ShardedSparseTable(resharding.GathersShards, tf.Module):
    """A SparseTable whose ids live in `len(devices)` shards, shard `id mod len(devices)` on `devices[k]`:
    the way to hold a table larger than one machine's memory on the parameter servers of a TensorFlow
    cluster (`"/job:ps/task:0"`, ...), or to spread its work over several devices of one.

    It reads and trains exactly as one SparseTable with the same initializer and optimizer (a new id's row
    is the same pure function of (seed, id); repeated ids' gradients are summed on the worker in the order
    the table sums them; every push advances every shard's step, so update counts, last steps and
    `evict(max_age=...)` agree; a push with a non-finite gradient changes no shard). Pulls and pushes run on
    the shards' devices (TensorFlow places each shard's ops with its table); each distinct id, with its
    row or summed gradient, travels once. `export()` gathers every shard; `import_` spreads any export.
    Checkpoints hold each shard's contents and its place (shard k of n), each written where its shard is;
    they restore into a table of any number of shards, or into a SparseTable, and a SparseTable's into this
    one (another layout's parts pass through the worker's memory). `.keras` files hold the gathered contents
    (a SparseEmbedding with any number of shards loads them).

    Args:
      dim: Row width, in [1, 2^20].
      devices: The shards' devices, a non-empty list (e.g. `["/job:ps/task:0", "/job:ps/task:1"]`).
      initializer: A `tf_lora.sparse_initializers` object (default `Zeros()`).
      optimizer: A `tf_lora.sparse_optimizers` object (default `SGD(0.01)`).
      name: Name of the table; shard k is `<name>_shard_<k>`.

    >>> sgd = tf_lora.sparse_optimizers.SGD(0.5)
    >>> table = tf_lora.ShardedSparseTable(4, ["/cpu:0", "/cpu:0"], optimizer=sgd)
    >>> table.pull([7, 42], training=True).shape
    TensorShape([2, 4])
    >>> table.push([7], tf.ones([1, 4]))
    >>> [int(shard.size()) for shard in table.shards]  # 42 on shard 0, 7 on shard 1
    [1, 1]
    >>> table.pull([7]).numpy()
    array([[-0.5, -0.5, -0.5, -0.5]], dtype=float32)
    """

    def __init__(self, dim, devices, initializer=None, optimizer=None, name="sparse_table"):
        super().__init__(name=None)
        if isinstance(devices, str) or not isinstance(devices, list | tuple) or not devices:
            raise ValueError(
                f"ShardedSparseTable: devices must be a non-empty list of devices, got {devices!r}"
            )
        if not all(isinstance(d, str) for d in devices):
            raise TypeError(f"ShardedSparseTable: devices must be device strings, got {devices!r}")
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
            raise TypeError(f"ShardedSparseTable: dim must be an integer, got {dim!r}")
        self._devices = list(devices)
        self._initializer = initializers.resolve(initializer, initializers.Zeros())
        self._optimizer = optimizers.resolve(optimizer, optimizers.SGD())
        self._table_name = name
        self.shards = []
        for k, device in enumerate(self._devices):
            try:
                with tf.device(device):
                    self.shards.append(
                        _Shard(dim, self._initializer, self._optimizer, f"{name}_shard_{k}", k, len(devices))
                    )
            except tf.errors.InvalidArgumentError as e:
                if "Could not satisfy device specification" not in str(e):
                    raise
                raise ValueError(
                    f"ShardedSparseTable {name!r}: this process has no device {device!r}: connect it to the "
                    "cluster first (tf.config.experimental_connect_to_cluster), or, to load a model trained "
                    "there, place its tables here (`with tf_lora.layers.sparse_table_devices(None): "
                    f"keras.models.load_model(path)`). TensorFlow: {e.message}"
                ) from None
        self._dim = self.shards[0].dim

    @property
    def name(self) -> str:
        return self._table_name

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def devices(self) -> list:
        return list(self._devices)

    @property
    def optimizer(self):
        return self._optimizer

    def _split(self, ids):
        """(each shard's ids, their positions in the flat ids) of int64 `ids`."""
        flat = tf.reshape(ids, [-1])
        count = len(self.shards)
        if count == 1:
            return [flat], [tf.range(tf.size(flat))]
        shard = tf.cast(tf.math.floormod(flat, count), tf.int32)
        return (
            tf.dynamic_partition(flat, shard, count),
            tf.dynamic_partition(tf.range(tf.size(flat)), shard, count),
        )

    def pull(self, ids, training=False) -> tf.Tensor:
        """The rows of `ids` (int64, any shape): `ids.shape + [dim]`, as SparseTable.pull."""
        ids = int64_ids(ids, "ShardedSparseTable.pull")
        with tf.device(_HOST):
            unique, index = tf.unique(tf.reshape(ids, [-1]), out_idx=tf.int64)
            parts, positions = self._split(unique)
        rows = [table.pull(part, training=training) for table, part in zip(self.shards, parts, strict=True)]
        with tf.device(_HOST):
            flat = tf.gather(tf.dynamic_stitch(positions, rows), index)
            return tf.reshape(flat, tf.concat([tf.shape(ids), [self._dim]], axis=0))

    def push_step(self, ids, grads, learning_rate=None) -> tf.Tensor:
        """Applies the optimizer to the rows of `ids` with `grads` (`ids.shape + [dim]`), as SparseTable.push,
        on every shard (those without ids of the push too, so that their steps agree); returns the step. A
        gradient that is not finite is refused before any shard changes."""
        ids = int64_ids(ids, "ShardedSparseTable.push")
        grads = tf.convert_to_tensor(grads, dtype=tf.float32)
        expected = ids.shape.concatenate([self._dim])
        if not grads.shape.is_compatible_with(expected):
            raise ValueError(
                f"ShardedSparseTable.push: grads must be ids.shape + [dim] = {expected}, got {grads.shape}"
            )
        with tf.device(_HOST):
            sized = tf.debugging.assert_equal(
                tf.shape(grads, out_type=tf.int64),
                tf.concat([tf.shape(ids, out_type=tf.int64), [self._dim]], 0),
                message="ShardedSparseTable.push: grads must be ids.shape + [dim]",
            )
            with tf.control_dependencies([sized]):
                unique, index = tf.unique(tf.reshape(ids, [-1]), out_idx=tf.int64)
                summed = tf.math.unsorted_segment_sum(
                    tf.reshape(grads, [-1, self._dim]), index, tf.size(unique, out_type=tf.int64)
                )
            learning_rate = self.shards[0].learning_rate(learning_rate)
            finite = tf.reduce_all(tf.math.is_finite(summed), axis=1)
            checked = [_refuse_non_finite(unique, finite), _refuse_bad_rate(learning_rate)]
            parts, positions = self._split(unique)
        with tf.control_dependencies([checked]):
            steps = [
                table.push_step(part, tf.gather(summed, position), learning_rate)
                for table, part, position in zip(self.shards, parts, positions, strict=True)
            ]
        return tf.reduce_max(tf.stack(steps))

    push = SparseTable.push  # the same contract over this table's push_step

    # Checkpointing: the shards save their own parts (each on its device); this table's own attributes are
    # a stand-in, or, in a SparseTable's checkpoint, its contents, which restore spread over the shards.
    def _gather_saveables_for_checkpoint(self):
        return resharding.own_saveables(self, _HOST)

    def remove(self, ids) -> tf.Tensor:
        """Removes `ids` (ids not in the table are ignored). Returns how many were removed."""
        parts, _ = self._split(int64_ids(ids, "ShardedSparseTable.remove"))
        return tf.add_n([table.remove(part) for table, part in zip(self.shards, parts, strict=True)])

    def evict(self, min_update_count=0, max_age=None) -> tf.Tensor:
        """As SparseTable.evict, on every shard. Returns how many ids were removed."""
        return tf.add_n([table.evict(min_update_count, max_age) for table in self.shards])

    def size(self) -> tf.Tensor:
        """The number of ids in the table (int64 scalar)."""
        return tf.add_n([table.size() for table in self.shards])

    def export(self) -> dict:
        """Every shard's ids with their values, slots, update counts and last steps, and the step."""
        return resharding.merged([table.export() for table in self.shards])

    def import_(self, contents: dict):
        """Replaces the contents with an `export()` (of this table, of a SparseTable, or of one with another
        number of shards), each id going to its shard. Eagerly, a refused import leaves every shard as it
        was (shards already imported get their old contents back); in a graph, each shard's import stands
        alone."""
        missing = set(CONTENTS) - set(contents)
        if missing:
            raise ValueError(f"ShardedSparseTable.import_: missing {sorted(missing)}")
        keys = int64_ids(contents["keys"], "ShardedSparseTable.import_")
        if keys.shape.rank not in (1, None):  # unknown in a graph's restore: the shards' imports check it
            raise ValueError(f"ShardedSparseTable.import_: keys must be a vector, got shape {keys.shape}")
        columns = {
            name: tf.convert_to_tensor(contents[name], tf.int64 if name in _INT64 else tf.float32)
            for name in ("values", "slots", "update_counts", "last_steps")
        }
        checks = []
        for name, column in columns.items():  # a row per key, before the keys are spread over the shards
            if column.shape.rank == 0:
                raise ValueError(f"ShardedSparseTable.import_: {name} must have a row per key, got a scalar")
            checks.append(
                tf.debugging.assert_equal(
                    tf.shape(column, out_type=tf.int64)[0],
                    tf.size(keys, out_type=tf.int64),
                    message=f"ShardedSparseTable.import_: {name} must have a row per key",
                )
            )
        with tf.control_dependencies(checks):
            parts, positions = self._split(keys)

        def shard_contents(part, position):
            return {
                "keys": part,
                **{name: tf.gather(column, position) for name, column in columns.items()},
                "step": contents["step"],
            }

        if not tf.executing_eagerly():
            return tf.group(
                [
                    table.import_(shard_contents(part, position))
                    for table, part, position in zip(self.shards, parts, positions, strict=True)
                ]
            )
        # On a parameter server, eager ops run asynchronously: each import is waited for (its shard's size
        # read back), so that a refusal surfaces here, while the others can still be undone.
        before = [{k: v.numpy() for k, v in table.export().items()} for table in self.shards]
        done = 0
        try:
            for table, part, position in zip(self.shards, parts, positions, strict=True):
                table.import_(shard_contents(part, position))
                int(table.size())
                done += 1
        except Exception:
            tf.experimental.async_clear_error()
            for table, old in zip(self.shards[: done + 1], before, strict=False):
                table.import_(old)
            raise
        return None


def _refuse_bad_rate(learning_rate):
    """The kernel's check of the learning rate, made on the worker before any shard's push (a shard on a
    parameter server refusing it reports through its transfers, not in these words)."""
    message = "ShardedSparseTable.push: learning_rate must be finite and >= 0, got {}"
    good = tf.logical_and(tf.math.is_finite(learning_rate), learning_rate >= 0)
    if tf.executing_eagerly():
        if not bool(good):
            raise tf.errors.InvalidArgumentError(None, None, message.format(float(learning_rate)))
        return tf.no_op()
    return tf.debugging.Assert(good, [message.format("(below)"), learning_rate])


def _refuse_non_finite(ids, finite):
    """An InvalidArgumentError naming the first id whose gradient is not finite, eagerly now, in a graph when
    the returned op runs (before any shard's push)."""
    message = "ShardedSparseTable.push: the gradient of id {} is not finite (NaN or Inf); nothing was pushed"
    if tf.executing_eagerly():
        if not bool(tf.reduce_all(finite)):
            bad = int(tf.boolean_mask(ids, tf.logical_not(finite))[0])
            raise tf.errors.InvalidArgumentError(None, None, message.format(bad))
        return tf.no_op()
    first = tf.boolean_mask(ids, tf.logical_not(finite))[:1]
    return tf.debugging.Assert(tf.reduce_all(finite), [message.format("(below)"), first])


class _Shard(SparseTable):
    """One shard of a ShardedSparseTable. Its checkpoints also hold its place, `layout` (index, count): the
    part of a checkpoint of another number of shards goes to the restore's gatherer, which imports all
    parts together; a part of another place restored into the shard alone is refused before anything is
    imported (its ids would sit in the wrong shard, reading as zeros)."""

    def __init__(self, dim, initializer, optimizer, name, index, count):
        self._layout = (index, count)
        super().__init__(dim, initializer, optimizer, name=name)

    def _serialize_to_tensors(self):
        return {**super()._serialize_to_tensors(), "layout": tf.constant(self._layout, tf.int64)}

    def _restore_from_tensors(self, restored_tensors):
        restored = dict(restored_tensors)
        layout = restored.pop("layout")
        gathered = resharding.gatherer_of(self)
        if gathered is not None:
            gatherer, saved_index = gathered
            return gatherer.receive(saved_index, layout, restored, self._update_uid)
        index, count = self._layout
        message = (
            f"ShardedSparseTable: the checkpoint's shard does not fit shard {index} of {count} "
            f"({self.name}): restore the whole table (it then takes any number of shards), not one shard"
        )
        with tf.control_dependencies(resharding.layout_checked(layout, self._layout, message, "; saved: {}")):
            return self.import_(restored)


_INT64 = ("update_counts", "last_steps")
