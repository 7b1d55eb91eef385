"""Checkpoints of sparse tables restore into any layout.

A SparseTable saves its contents as its own checkpoint attributes. A ShardedSparseTable saves each shard's
contents and place (shard k of n) under `shards/<k>`, so that each parameter server writes its own part,
and in its own attributes an empty stand-in of step -1 (no table has a negative step; SavedModels leave it
out). On restore (eager, as TensorFlow 2 restores):

- into as many shards as were saved, each shard reads its own part, as saved;
- into another number of shards, or into a SparseTable, the saved shards are gathered and imported (each id
  to its shard), through the `shards` dependency the restoring table looks up (`ShardGatherer`);
- a SparseTable's checkpoint into a ShardedSparseTable: its contents are imported, spread over the shards;
- the stand-in restores nothing.

Restoring into more shards than were saved, or a SparseTable's checkpoint into a ShardedSparseTable,
`assert_consumed()` reports the shards the checkpoint had no entry for, although their ids were restored.
"""

import weakref

import tensorflow as tf
from tensorflow.python.saved_model import save_context
from tensorflow.python.training.saving import saveable_object

# The step a ShardedSparseTable's own checkpoint attributes hold: no table's (the import refuses it).
STAND_IN_STEP = -1

# Each shard bound to the gatherer of the restore under way: a shard whose saved place differs from its own
# hands its part to it. Held apart from the shard's attributes, which TensorFlow would track and save.
_GATHERERS = weakref.WeakKeyDictionary()
# Each table's latest gatherer, kept while the table lives: TensorFlow's restore holds the objects it bound
# weakly, and `assert_consumed()` would find the gatherer and its saved shards gone.
_LATEST = weakref.WeakKeyDictionary()


def stand_in(dim):
    """A ShardedSparseTable's own checkpoint attributes: SparseTable's names, no ids, step -1."""
    return {
        "keys": tf.zeros([0], tf.int64),
        "values": tf.zeros([0, dim], tf.float32),
        "slots": tf.zeros([0, 0], tf.float32),
        "update_counts": tf.zeros([0], tf.int64),
        "last_steps": tf.zeros([0], tf.int64),
        "step": tf.constant(STAND_IN_STEP, tf.int64),
    }


def restore_contents(table, restored, in_graphs=True):
    """Restores a table's own checkpoint attributes: contents are imported (for a ShardedSparseTable, spread
    over its shards); a ShardedSparseTable's stand-in changes nothing (its shards hold the rows).

    In a graph (TF1 sessions; SavedModel traces the restore), with `in_graphs` the contents are imported
    as they come: a SparseTable never sees a stand-in alone there (the sharded checkpoint's shards refuse
    a graph's restore first; the import would refuse step -1), and a condition around the import would hide
    it from the rewrite tools. Without it (a ShardedSparseTable: SavedModel's graph reaches copies of its
    shards, not its shards) anything but the stand-in is refused."""
    if tf.executing_eagerly():
        if int(restored["step"]) == STAND_IN_STEP:
            return None
        return table.import_(restored)
    if not in_graphs:
        return tf.debugging.Assert(
            tf.equal(restored["step"], STAND_IN_STEP),
            [
                f"{type(table).__name__} {table.name!r}: a SparseTable's checkpoint restores into a "
                "ShardedSparseTable eagerly only (TensorFlow 2's tf.train.Checkpoint.restore outside "
                "tf.function)"
            ],
        )
    return table.import_(restored)


def own_saveables(table, host):
    """A ShardedSparseTable's own checkpoint attributes (`_gather_saveables_for_checkpoint`): one saveable
    named "" (it answers for any attribute, and its tensors take a SparseTable's names). None in a
    SavedModel: a loaded SavedModel revives the table as a plain object, whose save functions TensorFlow
    then tracks twice, and re-saving it failed."""
    if save_context.in_save_context():
        return {}
    return {"": lambda name: _OwnContents(table, name, host)}


class _OwnContents(saveable_object.SaveableObject):
    """A ShardedSparseTable's own attributes: the stand-in saved, anything restored (restore_contents)."""

    def __init__(self, table, name, host):
        self._table = table
        with tf.device(host):
            tensors = stand_in(table.dim)
        self._names = list(tensors)
        specs = [saveable_object.SaveSpec(t, "", name + key) for key, t in tensors.items()]
        super().__init__(table, specs, name)

    def restore(self, restored_tensors, restored_shapes):
        del restored_shapes
        return restore_contents(self._table, dict(zip(self._names, restored_tensors, strict=True)), False)


def gatherer(table, name, cached_dependencies):
    """What `table` restores the checkpoint's `name` dependency into: a ShardGatherer for `shards` while
    restoring (`cached_dependencies` is only given by the restore), else None (TensorFlow's own lookup)."""
    if name == "shards" and cached_dependencies is not None:
        _LATEST[table] = ShardGatherer(table)
        return _LATEST[table]
    return None


class ShardGatherer(tf.__internal__.tracking.Trackable):
    """The `shards` of a checkpoint, as a table restores them: saved shard k goes to the table's shard k
    where it has one (which reads its part directly when the layouts match), else to a stand-in that hands
    its part here; once every saved shard's part came, they are imported into the table together."""

    def __init__(self, table):
        self._table = table
        self._parts = {}
        self._saved = []  # the stand-ins for saved shards the table has no shard for

    def _lookup_dependency(self, name, cached_dependencies=None):
        if not name.isdigit():
            return None
        index = int(name)
        shards = getattr(self._table, "shards", [])
        if index < len(shards):
            _GATHERERS[shards[index]] = self
            return shards[index]
        self._saved.append(_SavedShard(self, self._table.dim))
        return self._saved[-1]

    def receive(self, layout, contents):
        """Takes saved shard `layout` = (k, n)'s contents; imports all n once the last one came."""
        if not tf.executing_eagerly():
            raise ValueError(
                f"{type(self._table).__name__} {self._table.name!r}: a checkpoint of a table of another "
                "number of shards restores eagerly only (TensorFlow 2's tf.train.Checkpoint.restore outside "
                "tf.function); in a graph, restore into a table of as many shards as the one saved"
            )
        index, count = (int(v) for v in tf.convert_to_tensor(layout).numpy())
        self._parts[index] = contents
        if len(self._parts) < count:
            return None
        if sorted(self._parts) != list(range(count)):
            raise ValueError(
                f"{type(self._table).__name__} {self._table.name!r}: the checkpoint's shards "
                f"{sorted(self._parts)} are not shards 0..{count - 1}"
            )
        parts = [self._parts[k] for k in range(count)]
        self._parts = {}
        merged = {name: tf.concat([part[name] for part in parts], 0) for name in parts[0] if name != "step"}
        merged["step"] = tf.reduce_max(tf.stack([part["step"] for part in parts]))
        return self._table.import_(merged)


def take_gatherer(shard):
    """The gatherer of the restore under way that bound `shard`, or None; unbinds it."""
    return _GATHERERS.pop(shard, None)


class _SavedShard(tf.__internal__.tracking.Trackable):
    """A saved shard the restoring table has no shard for: its part goes to the gatherer."""

    def __init__(self, gatherer, dim):
        self._gatherer = gatherer
        self._dim = dim

    def _serialize_to_tensors(self):
        # Only what the restore reads: the names and dtypes of a shard's checkpoint attributes.
        return {**stand_in(self._dim), "layout": tf.zeros([2], tf.int64)}

    def _restore_from_tensors(self, restored_tensors):
        restored = dict(restored_tensors)
        layout = restored.pop("layout")
        return self._gatherer.receive(layout, restored)
