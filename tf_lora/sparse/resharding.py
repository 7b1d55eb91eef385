"""Checkpoints of sparse tables restore into any layout.

A SparseTable saves its contents as its own checkpoint attributes. A ShardedSparseTable saves each shard's
contents and place (shard k of n) under `shards/<k>`, so that each parameter server writes its own part,
and in its own attributes an empty stand-in of step -1 (no table has a negative step). On restore (eagerly,
in a tf.function, as TensorFlow restores on parameter servers, or in a TF1 graph):

- into as many shards as were saved, each shard reads its own part, as saved;
- into another number of shards, or into a SparseTable, the saved shards' parts are gathered on the worker
  and imported together (each id to its shard), through the `shards` dependency the restoring table looks
  up (`ShardGatherer`): the whole table passes through the worker's memory then;
- a SparseTable's checkpoint into a ShardedSparseTable: its contents are imported, spread over the shards;
- the stand-in restores nothing.

Restoring into more shards than were saved, or a SparseTable's checkpoint into a ShardedSparseTable,
`assert_consumed()` and `assert_existing_objects_matched()` report the shards the checkpoint had no entry
for, although their ids were restored.
"""

import weakref

import tensorflow as tf
from tensorflow.python.saved_model import save_context
from tensorflow.python.training.saving import saveable_object

# The step a ShardedSparseTable's own checkpoint attributes hold: no table's (the import refuses it).
STAND_IN_STEP = -1

# Each shard bound to (the gatherer of the restore under way, its saved index): a shard whose checkpoint has
# another number of shards hands its part to it. Held apart from the shard's attributes, which TensorFlow
# would track and save; the gatherer holds its table weakly.
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


def merged(parts):
    """One table's contents from the contents of its parts (shards): rows concatenated, the latest step."""
    contents = {name: tf.concat([part[name] for part in parts], 0) for name in parts[0] if name != "step"}
    contents["step"] = tf.reduce_max(tf.stack([part["step"] for part in parts]))
    return contents


def restore_contents(table, restored):
    """Restores a table's own checkpoint attributes: contents are imported (for a ShardedSparseTable, spread
    over its shards); a ShardedSparseTable's stand-in changes nothing (its shards hold the rows). In a graph
    the choice is made when the restore runs (the rewrite tools count a restore function's branches as
    part of it)."""
    for shard in getattr(table, "shards", []):  # restored with the table (see ShardGatherer.receive)
        shard._update_uid = max(shard._update_uid, table._update_uid)  # noqa: SLF001
    if tf.executing_eagerly():
        if int(restored["step"]) == STAND_IN_STEP:
            return None
        return table.import_(restored)

    def load():
        with tf.control_dependencies([table.import_(restored)]):
            return tf.constant(True)

    return tf.cond(tf.equal(restored["step"], STAND_IN_STEP), lambda: tf.constant(False), load)


def own_saveables(table, host):
    """A ShardedSparseTable's own checkpoint attributes (`_gather_saveables_for_checkpoint`): one saveable
    named "" (it answers for any attribute, and its tensors take a SparseTable's names). Left out of a
    SavedModel's object graph: a loaded SavedModel revives the table as a plain object, whose save
    functions TensorFlow then tracks twice, and re-saving it failed. (TensorFlow writes a SavedModel's
    variables after its save context ends: the stand-in's six empty tensors are there, unused.)"""
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
        return restore_contents(self._table, dict(zip(self._names, restored_tensors, strict=True)))


class GathersShards:
    """Mixed into the table classes: a checkpoint's `shards` (a ShardedSparseTable's) restore into this
    table whatever its layout, through a ShardGatherer (`_lookup_dependency` is given `cached_dependencies`
    by the restore only)."""

    def _lookup_dependency(self, name, cached_dependencies=None):
        if name == "shards" and cached_dependencies is not None:
            _LATEST[self] = ShardGatherer(self)
            return _LATEST[self]
        return super()._lookup_dependency(name, cached_dependencies)


class ShardGatherer(tf.__internal__.tracking.Trackable):
    """The `shards` of a checkpoint, as a table restores them: saved shard k goes to the table's shard k
    where it has one, else to a stand-in. With as many saved shards as the table has, each shard reads its
    own part; else every part comes here, and once all came they are imported into the table together.
    The saved shards are the checkpoint's, known before any part comes (TensorFlow looks up every object of
    a restore before it reads any value)."""

    def __init__(self, table):
        self._table = weakref.ref(table)
        self._indices = set()
        self._parts = {}
        self._saved = []  # the stand-ins for saved shards the table has no shard for

    def _lookup_dependency(self, name, cached_dependencies=None):
        if not name.isdigit():
            return None
        index = int(name)
        self._indices.add(index)
        table = self._table()
        shards = getattr(table, "shards", [])
        if index < len(shards):
            _GATHERERS[shards[index]] = (self, index)
            return shards[index]
        self._saved.append(_SavedShard(self, index, table.dim))
        return self._saved[-1]

    def gathers(self):
        """Whether the parts go to the table together (the checkpoint has another number of shards)."""
        return len(self._indices) != len(getattr(self._table(), "shards", []))

    def receive(self, index, layout, contents, uid):
        """Takes saved shard `index`'s contents (and its `layout`, checked against the checkpoint's) from
        an object this restore bound (`uid`, its restore's number); imports all parts once the last one
        came, unless a newer restore of the table came first (TensorFlow runs pending restores newest
        first, and skips what a newer one restored: so do the parts, and the table's shards then count as
        restored by this one)."""
        table = self._table()
        count = len(self._indices)
        message = (
            f"{type(table).__name__} {table.name!r}: the checkpoint's shard {index} of {count} says it is "
            "another shard"
        )
        with tf.control_dependencies(layout_checked(layout, (index, count), message, " ({})")):
            contents = {name: tf.identity(value) for name, value in contents.items()}
        self._parts[index] = contents
        self._uid = max(getattr(self, "_uid", uid), uid)
        if set(self._parts) != self._indices:
            return None
        parts = [self._parts[k] for k in sorted(self._parts)]
        self._parts = {}
        if table._update_uid > self._uid:  # noqa: SLF001 - TensorFlow's restore bookkeeping
            return None
        for shard in getattr(table, "shards", []):
            shard._update_uid = max(shard._update_uid, self._uid)  # noqa: SLF001
        return table.import_(merged(parts))


def layout_checked(layout, expected, message, saved_format):
    """Checks a saved shard's `layout` (its index and count) against `expected`: eagerly, a ValueError of
    `message` + `saved_format` filled with "shard k of n" now ([] returned); in a graph, [the assertion]."""
    if tf.executing_eagerly():
        saved = tuple(int(v) for v in tf.convert_to_tensor(layout).numpy())
        if saved != tuple(expected):
            raise ValueError(message + saved_format.format(f"shard {saved[0]} of {saved[1]}"))
        return []
    return [tf.debugging.assert_equal(layout, tf.constant(expected, tf.int64), message=message)]


def gatherer_of(shard):
    """(the gatherer of the restore under way that bound `shard`, the saved index) if that gatherer gathers,
    else None; unbinds it."""
    bound = _GATHERERS.pop(shard, None)
    return bound if bound is not None and bound[0].gathers() else None


class _SavedShard(tf.__internal__.tracking.Trackable):
    """A saved shard the restoring table has no shard for: its part goes to the gatherer."""

    def __init__(self, gatherer, index, dim):
        self._gatherer = gatherer
        self._index = index
        self._dim = dim

    def _serialize_to_tensors(self):
        # Only what the restore reads: the names and dtypes of a shard's checkpoint attributes.
        return {**stand_in(self._dim), "layout": tf.zeros([2], tf.int64)}

    def _restore_from_tensors(self, restored_tensors):
        restored = dict(restored_tensors)
        layout = restored.pop("layout")
        return self._gatherer.receive(self._index, layout, restored, self._update_uid)
