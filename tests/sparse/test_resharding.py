"""Checkpoints of sparse tables restore into any layout: a ShardedSparseTable's into another number of shards
or into a SparseTable, a SparseTable's into a ShardedSparseTable. A sharded checkpoint read into a SparseTable
(or the reverse) used to restore nothing, silently; into another number of shards it was refused."""

import gc
import weakref

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_lora
from tf_lora.sparse.sharded_table import _Shard

DIM = 3
LAYOUTS = [0, 1, 2, 3]  # 0: a SparseTable, k: a ShardedSparseTable of k shards


def _table(shards, dim=DIM):
    init = tf_lora.sparse_initializers.RandomNormal(stddev=0.1, seed=11)
    adam = tf_lora.sparse_optimizers.Adam(0.01)  # two slots a value: slot rows are 2 * dim wide
    if shards == 0:
        return tf_lora.SparseTable(dim, init, adam, name="t")
    return tf_lora.ShardedSparseTable(dim, ["/cpu:0"] * shards, init, adam, name="t")


def _contents(table):
    contents = {name: value.numpy() for name, value in table.export().items()}
    order = np.argsort(contents["keys"])
    return {name: (value[order] if value.ndim else value) for name, value in contents.items()}


def _assert_same(a, b):
    a, b = _contents(a), _contents(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _train(table, seed, steps=3):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        ids = np.concatenate([rng.integers(-40, 40, 30), [np.iinfo(np.int64).min, np.iinfo(np.int64).max]])
        table.pull(ids, training=True)
        table.push(ids, rng.standard_normal((len(ids), DIM)).astype(np.float32))


@pytest.mark.parametrize("restored", LAYOUTS)
@pytest.mark.parametrize("saved", LAYOUTS)
def test_a_checkpoint_restores_into_any_layout(tmp_path, saved, restored):
    original = _table(saved)
    _train(original, seed=saved)
    path = tf.train.Checkpoint(table=original).write(str(tmp_path / "ckpt"))
    table = _table(restored)
    table.pull([1000, 1001], training=True)  # replaced by the restore
    status = tf.train.Checkpoint(table=table).read(path)
    _assert_same(original, table)
    for index, shard in enumerate(getattr(table, "shards", [])):  # each id in its own shard
        keys = shard.export()["keys"].numpy()
        assert np.all(np.mod(keys, len(table.shards)) == index)
    # TensorFlow's check reports the table's shards the checkpoint had no entry for (restored all the same).
    if restored == 0 or 0 < restored <= saved:
        status.assert_consumed()
    else:
        with pytest.raises(AssertionError, match="not bound to checkpointed values"):
            status.assert_consumed()
    # Both go on training alike: the same rows, slots, counts and step.
    _train(original, seed=7)
    _train(table, seed=7)
    _assert_same(original, table)


def test_a_checkpoint_of_empty_shards(tmp_path):
    original = _table(3)
    original.push([0, 3, 6], np.ones((3, DIM), np.float32))  # shards 1 and 2 empty
    path = tf.train.Checkpoint(table=original).write(str(tmp_path / "ckpt"))
    for layout in (0, 2):
        table = _table(layout)
        tf.train.Checkpoint(table=table).read(path).assert_consumed()
        _assert_same(original, table)
    empty = tf.train.Checkpoint(table=_table(2)).write(str(tmp_path / "empty"))
    table = _table(3)
    table.push([5], np.ones((1, DIM), np.float32))
    tf.train.Checkpoint(table=table).read(empty)
    assert int(table.size()) == 0


def test_a_checkpoint_without_the_stand_in(tmp_path):
    """Sharded checkpoints written before the table saved its stand-in: only `shards` under the table."""
    init = tf_lora.sparse_initializers.RandomNormal(stddev=0.1, seed=11)
    adam = tf_lora.sparse_optimizers.Adam(0.01)
    old = tf.Module()
    old.shards = [_Shard(DIM, init, adam, f"t_shard_{k}", k, 2) for k in range(2)]
    reference = _table(0)
    _train(reference, seed=1)
    contents = reference.export()
    keys = contents["keys"].numpy()
    for k, shard in enumerate(old.shards):
        mine = np.mod(keys, 2) == k
        shard.import_({n: (v if n == "step" else tf.boolean_mask(v, mine)) for n, v in contents.items()})
    path = tf.train.Checkpoint(table=old).write(str(tmp_path / "ckpt"))
    for layout in (0, 2, 3):
        table = _table(layout)
        tf.train.Checkpoint(table=table).read(path)
        _assert_same(reference, table)


@pytest.mark.parametrize("saved,restored", [(2, 3), (2, 0), (0, 2), (3, 3)])
def test_a_refused_restore_leaves_the_table_as_it_was(tmp_path, saved, restored):
    original = _table(saved, dim=4)  # a checkpoint of rows 4 wide, read into a table of rows 3 wide
    _train_wide = np.ones((3, 4), np.float32)
    original.push([1, 2, 3], _train_wide)
    path = tf.train.Checkpoint(table=original).write(str(tmp_path / "ckpt"))
    table = _table(restored)
    _train(table, seed=3)
    before = _contents(table)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="values"):
        tf.train.Checkpoint(table=table).read(path)
    tf.experimental.async_clear_error()
    after = _contents(table)
    for name in before:
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)


def test_a_shard_restored_alone_must_fit(tmp_path):
    path = tf.train.Checkpoint(shard=_table(2).shards[0]).write(str(tmp_path / "ckpt"))
    with pytest.raises(ValueError, match=r"does not fit shard 0 of 3 .*saved: shard 0 of 2"):
        tf.train.Checkpoint(shard=_table(3).shards[0]).read(path)


@pytest.mark.parametrize("saved", [0, 2])
def test_graph_restores_into_any_layout(tmp_path, saved):
    # TensorFlow restores in a graph in TF1 sessions, and in a tf.function where the saved values span
    # several tasks (parameter servers): a restore into another layout was refused there.
    original = _table(saved)
    _train(original, seed=0)
    path = tf.train.Checkpoint(table=original).write(str(tmp_path / "ckpt"))
    expected = _contents(original)
    for layout in (0, 2, 3):
        with tf.Graph().as_default():
            table = _table(layout)
            status = tf.train.Checkpoint(table=table).read(path)
            with tf.compat.v1.Session() as session:
                status.run_restore_ops(session)
                got = session.run(table.export())
        order = np.argsort(got["keys"])
        for name, value in expected.items():
            np.testing.assert_array_equal(
                got[name] if name == "step" else got[name][order], value, err_msg=name
            )


@pytest.mark.parametrize("older,newer", [(2, 0), (3, 2), (0, 3), (2, 3)])
@pytest.mark.parametrize("layout", [0, 2, 3])
def test_pending_restores_of_a_table_made_later_the_newest_wins(tmp_path, older, newer, layout):
    # Two restores before the table exists (TensorFlow defers them, then runs the newest first and skips
    # what it restored): the older one's gathered or direct parts overwrote the newer's rows.
    paths = {}
    for saved, value in ((older, 1.0), (newer, 2.0)):
        module = tf.Module()
        module.table = _table(saved)
        module.table.push(np.arange(-6, 6), np.full((12, DIM), value, np.float32))
        paths[value] = tf.train.Checkpoint(m=module).write(str(tmp_path / f"ckpt_{value}"))
        expected = _contents(module.table)
    module = tf.Module()
    tf.train.Checkpoint(m=module).read(paths[1.0])
    tf.train.Checkpoint(m=module).read(paths[2.0])
    module.table = _table(layout)
    got = _contents(module.table)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_a_restored_table_is_freed(tmp_path):
    # The restore's gatherer held its table, kept for the table's life: no restored table was ever freed.
    original = _table(2)
    _train(original, seed=0)
    path = tf.train.Checkpoint(table=original).write(str(tmp_path / "ckpt"))
    for layout in (0, 2, 3):
        table = _table(layout)
        tf.train.Checkpoint(table=table).read(path)
        gone = weakref.ref(table)
        del table
        gc.collect()
        assert gone() is None, layout


def test_a_saved_model_of_a_sharded_table(tmp_path):
    table = _table(2)
    _train(table, seed=2)
    module = tf.Module()
    module.table = table
    module.pull = tf.function(lambda ids: table.pull(ids), input_signature=[tf.TensorSpec([None], tf.int64)])
    tf.saved_model.save(module, str(tmp_path / "model"), signatures={"pull": module.pull})
    ids = tf.constant([-40, -3, 0, 5, 39, 1000], tf.int64)
    loaded = tf.saved_model.load(str(tmp_path / "model"))
    np.testing.assert_array_equal(loaded.pull(ids), table.pull(ids))
    # Loaded, it saves again (the table's own checkpoint attributes, were they in the SavedModel, broke it).
    tf.saved_model.save(loaded, str(tmp_path / "again"), signatures=dict(loaded.signatures))
    np.testing.assert_array_equal(tf.saved_model.load(str(tmp_path / "again")).pull(ids), table.pull(ids))
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:  # the loader TF Serving uses
        signature = tf.compat.v1.saved_model.load(session, ["serve"], str(tmp_path / "model")).signature_def
        inputs, outputs = signature["pull"].inputs, signature["pull"].outputs
        restored = session.run(outputs["output_0"].name, {inputs["ids"].name: ids.numpy()})
    np.testing.assert_array_equal(restored, table.pull(ids))


@pytest.mark.parametrize("saved,restored", [([2], None), (None, [3])])
def test_a_keras_model_checkpoint_moves_between_layouts(tmp_path, saved, restored):
    def model(devices):
        keras.utils.set_random_seed(4)
        ids = keras.Input((3,), dtype="int64")
        emb = tf_lora.layers.SparseEmbedding(4, combiner="sum", devices=devices, name="emb")
        net = keras.Model(ids, keras.layers.Dense(1, name="out")(emb(ids)))
        net.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
        return net

    def devices(count):
        return None if count is None else ["/cpu:0"] * count[0]

    rng = np.random.default_rng(0)
    x = rng.integers(-50, 50, (64, 3)).astype(np.int64)
    y = rng.standard_normal((64, 1)).astype(np.float32)
    original = model(devices(saved))
    original.fit(x, y, batch_size=16, epochs=2, verbose=0)
    path = tf.train.Checkpoint(model=original, optimizer=original.optimizer).write(str(tmp_path / "ckpt"))
    moved = model(devices(restored))
    moved.fit(x[:16], y[:16], batch_size=16, verbose=0)  # builds its optimizer, gives its table other rows
    tf.train.Checkpoint(model=moved, optimizer=moved.optimizer).read(path)
    _assert_same(original.get_layer("emb").table, moved.get_layer("emb").table)
    np.testing.assert_array_equal(moved.predict(x, verbose=0), original.predict(x, verbose=0))
    original.fit(x, y, batch_size=16, verbose=0)  # resumes alike, momentum included
    moved.fit(x, y, batch_size=16, verbose=0)
    np.testing.assert_allclose(moved.predict(x, verbose=0), original.predict(x, verbose=0), rtol=1e-6)
