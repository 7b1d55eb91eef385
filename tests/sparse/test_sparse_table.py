"""tf_lora.SparseTable: pull/push semantics, optimizers against Keras on a dense variable, import/export."""

import copy
import gc
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_lora
from tf_lora.python.ops import sparse_table_ops

init = tf_lora.sparse_initializers
opt = tf_lora.sparse_optimizers


def test_training_pull_inserts_inference_pull_does_not():
    table = tf_lora.SparseTable(3, initializer=init.RandomUniform(1.0, 2.0, seed=1))
    values = table.pull([[5, 6], [5, 9]], training=True)
    assert values.shape == (2, 2, 3) and int(table.size()) == 3
    np.testing.assert_array_equal(values[0, 0], values[1, 0])  # the same id, the same row
    assert np.all((values.numpy() >= 1.0) & (values.numpy() < 2.0))
    out = table.pull([5, 1000])
    np.testing.assert_array_equal(out[0], values[0, 0])
    np.testing.assert_array_equal(out[1], np.zeros(3))
    assert int(table.size()) == 3


def test_large_training_pull_with_repeats_inserts_each_id_once():
    """Missing ids found by several workers, repeated across the batch: one row each, the same everywhere."""
    table = tf_lora.SparseTable(4, initializer=init.RandomNormal(0.0, 1.0, seed=2))
    table.pull(np.arange(0, 3000, 2), training=True)  # the even ids are there already, the odd ones not
    ids = np.random.default_rng(1).integers(0, 3000, 20_000)
    values = table.pull(ids, training=True).numpy()
    assert int(table.size()) == 1500 + len(np.unique(ids[ids % 2 == 1]))
    first = {}
    for i, row in zip(ids, values, strict=True):
        np.testing.assert_array_equal(row, first.setdefault(i, row))
    reference = tf_lora.SparseTable(4, initializer=init.RandomNormal(0.0, 1.0, seed=2))
    np.testing.assert_array_equal(
        values, reference.pull(ids, training=True).numpy()
    )  # rows depend on ids only


def test_initial_rows_depend_on_seed_and_id_only():
    ids = np.random.default_rng(0).integers(-(2**40), 2**40, 500)
    t1 = tf_lora.SparseTable(8, initializer=init.RandomNormal(0.0, 1.0, seed=7))
    t2 = tf_lora.SparseTable(8, initializer=init.RandomNormal(0.0, 1.0, seed=7))
    t3 = tf_lora.SparseTable(8, initializer=init.RandomNormal(0.0, 1.0, seed=8))
    forward = t1.pull(ids, training=True).numpy()
    backward = t2.pull(ids[::-1], training=True).numpy()[::-1]
    np.testing.assert_array_equal(forward, backward)
    assert not np.allclose(forward, t3.pull(ids, training=True).numpy())


def test_truncated_normal_stays_within_two_stddevs():
    table = tf_lora.SparseTable(16, initializer=init.TruncatedNormal(1.0, 0.5, seed=3))
    values = table.pull(np.arange(2000), training=True).numpy()
    assert np.all(np.abs(values - 1.0) <= 1.0 + 1e-6)
    assert abs(values.mean() - 1.0) < 0.02 and 0.35 < values.std() < 0.5


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize(
    "make",
    [
        (lambda: opt.SGD(0.3), lambda: keras.optimizers.SGD(0.3)),
        (lambda: opt.Adagrad(0.2), lambda: keras.optimizers.Adagrad(0.2)),
    ],
    ids=["sgd", "adagrad"],
)
def test_optimizer_matches_keras_on_a_dense_variable(make, mode):
    ours, theirs = make
    rng = np.random.default_rng(1)
    table = tf_lora.SparseTable(4, optimizer=ours())
    dense = tf.Variable(tf.zeros([50, 4]))
    keras_opt = theirs()
    push = table.push if mode == "eager" else tf.function(table.push)
    for _ in range(5):
        ids = rng.integers(0, 50, 40)  # with duplicates
        grads = rng.standard_normal((40, 4)).astype(np.float32)
        push(ids, grads)
        # The dense variable's gradient: duplicates summed, zero for ids not pushed (which then move
        # under neither optimizer). Keras given the IndexedSlices instead squares each duplicate
        # separately into Adagrad's accumulator.
        keras_opt.apply_gradients([(tf.math.unsorted_segment_sum(grads, ids, 50), dense)])
    np.testing.assert_allclose(table.pull(np.arange(50)), dense, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "make",
    [
        (lambda: opt.Adam(0.05), lambda: keras.optimizers.Adam(0.05)),
        (
            lambda: opt.Ftrl(0.2, l1_regularization_strength=0.01, l2_regularization_strength=0.1),
            lambda: keras.optimizers.Ftrl(
                0.2, l1_regularization_strength=0.01, l2_regularization_strength=0.1
            ),
        ),
    ],
    ids=["adam", "ftrl"],
)
def test_moment_optimizers_match_keras_when_every_id_is_pushed(make):
    """Keras's Adam and FTRL move every row of a dense variable at every step (moments decay, FTRL recomputes
    from its linear term), so a lazily updated table matches them when each step pushes every id."""
    ours, theirs = make
    rng = np.random.default_rng(2)
    table = tf_lora.SparseTable(4, optimizer=ours())
    dense = tf.Variable(tf.zeros([30, 4]))
    keras_opt = theirs()
    for _ in range(6):
        ids = np.concatenate([rng.permutation(30), rng.integers(0, 30, 10)])  # all ids, and duplicates
        grads = rng.standard_normal((40, 4)).astype(np.float32)
        table.push(ids, grads)
        keras_opt.apply_gradients([(tf.math.unsorted_segment_sum(grads, ids, 30), dense)])
    np.testing.assert_allclose(table.pull(np.arange(30)), dense, rtol=1e-6, atol=1e-6)


def test_learning_rate_may_be_a_variable():
    lr = tf.Variable(1.0)
    table = tf_lora.SparseTable(2, optimizer=opt.SGD(lr))
    table.push([1], [[1.0, 1.0]])
    lr.assign(0.5)
    table.push([1], [[1.0, 1.0]])
    np.testing.assert_allclose(table.pull([1]), [[-1.5, -1.5]])


def test_export_import_round_trip():
    table = tf_lora.SparseTable(3, initializer=init.RandomUniform(seed=2), optimizer=opt.Adagrad(0.1))
    ids = np.arange(0, 3000, 3)
    table.push(ids, np.ones((ids.size, 3), np.float32))
    table.push(ids[:10], np.ones((10, 3), np.float32))
    contents = table.export()
    assert contents["slots"].shape == (1000, 3) and int(contents["step"]) == 2
    counts = dict(zip(contents["keys"].numpy(), contents["update_counts"].numpy(), strict=True))
    assert counts[0] == 2 and counts[30] == 1
    copy = tf_lora.SparseTable(3, optimizer=opt.Adagrad(0.1))
    copy.import_(contents)
    np.testing.assert_array_equal(copy.pull(ids), table.pull(ids))
    again = copy.export()
    order_a, order_b = np.argsort(contents["keys"]), np.argsort(again["keys"])
    for name in ("keys", "values", "slots", "update_counts", "last_steps"):
        np.testing.assert_array_equal(contents[name].numpy()[order_a], again[name].numpy()[order_b])


# ---- Bad input: clear errors, the table unchanged ----


def _snapshot(table):
    contents = table.export()
    order = np.argsort(contents["keys"])
    return {k: v.numpy()[order] if v.shape.rank else v.numpy() for k, v in contents.items()}


def _assert_same(a, b):
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_bad_push_leaves_table_unchanged():
    table = tf_lora.SparseTable(4)
    table.push([1, 2], np.ones((2, 4), np.float32))
    before = _snapshot(table)
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=r"grads must have shape ids.shape \+ \[dim\] = \[2,4\]"
    ):
        table.push([1, 2], np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match="grads must have shape ids.shape"):
        tf.function(table.push).get_concrete_function(tf.constant([1, 2], tf.int64), tf.ones([3, 4]))
    with pytest.raises(TypeError, match="ids must be int64, got int32"):
        table.push(tf.constant([1, 2], tf.int32), np.ones((2, 4), np.float32))
    with pytest.raises(TypeError, match="ids must be int64, got float32"):
        table.pull(tf.constant([1.0]))
    _assert_same(before, _snapshot(table))


def test_bad_import_leaves_table_unchanged():
    table = tf_lora.SparseTable(2, optimizer=opt.Adagrad())
    table.push([1, 2, 3], np.ones((3, 2), np.float32))
    before = _snapshot(table)
    good = table.export()
    bad_dim = dict(good, values=tf.zeros([3, 5]))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"values must have shape \[3,2\]"):
        table.import_(bad_dim)
    bad_len = dict(good, update_counts=tf.zeros([2], tf.int64))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"update_counts must have shape \[3\]"):
        table.import_(bad_len)
    duplicate = dict(good, keys=tf.constant([4, 4, 5], tf.int64))
    with pytest.raises(tf.errors.InvalidArgumentError, match="duplicate key 4; the table is unchanged"):
        table.import_(duplicate)
    with pytest.raises(ValueError, match=r"missing \['step'\]"):
        table.import_({k: v for k, v in good.items() if k != "step"})
    _assert_same(before, _snapshot(table))


@pytest.mark.parametrize(
    "optimizer, slots",
    [(opt.Adagrad, [0]), (opt.Adam, [1]), (opt.Ftrl, [0])],
    ids=["adagrad", "adam", "ftrl"],
)
def test_import_refuses_what_a_push_would_turn_into_nan(optimizer, slots):
    # NaN values and negative accumulators were imported, and the next push wrote NaN rows.
    table = tf_lora.SparseTable(2, optimizer=optimizer(0.1))
    table.push([1, 2], np.ones((2, 2), np.float32))
    before = _snapshot(table)
    good = {k: np.asarray(v) for k, v in table.export().items()}
    values = good["values"].copy()
    values[1, 0] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match="its values are not all finite; the table is"):
        table.import_(dict(good, values=values))
    for slot in slots:  # the accumulator (Adam: the second moment)
        negative = good["slots"].copy()
        negative[0, slot * 2 + 1] = -1.0
        with pytest.raises(tf.errors.InvalidArgumentError, match="must be >=? 0 for this table's optimizer"):
            table.import_(dict(good, slots=negative))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"update count -3 is outside \[0, 2\^62\)"):
        table.import_(dict(good, update_counts=np.array([1, -3])))
    _assert_same(before, _snapshot(table))
    other = tf_lora.SparseTable(2, optimizer=opt.SGD(0.1))
    with pytest.raises(tf.errors.InvalidArgumentError, match="whose optimizer, SGD, keeps 0 slot"):
        other.import_(good)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: opt.Adam(0.1, beta_1=1.0), r"beta_1 must be finite and in \[0.0, 1.0\)"),
        (lambda: opt.Adam(0.1, beta_2=1.0), r"beta_2 must be finite and in \[0.0, 1.0\)"),
        (lambda: opt.Adam(0.1, epsilon=0.0), r"epsilon must be finite and in \(0.0, inf\]"),
        (lambda: opt.Adagrad(0.1, initial_accumulator_value=0.0, epsilon=0.0), "both 0"),
        (lambda: opt.Ftrl(0.1, initial_accumulator_value=0.0), "both 0"),
        (lambda: tf_lora.sparse_initializers.RandomNormal(stddev=float("nan")), "stddev must be a finite"),
        (lambda: tf_lora.sparse_initializers.RandomNormal(mean=float("inf")), "mean must be a finite"),
        (lambda: tf_lora.sparse_initializers.TruncatedNormal(stddev=-1.0), "stddev must be >= 0"),
        (lambda: tf_lora.sparse_initializers.RandomUniform(1.0, -1.0), "minval 1.0 > maxval -1.0"),
        (lambda: tf_lora.sparse_initializers.RandomUniform(seed=-1), r"seed must be an int in \[0, 2\^63\)"),
    ],
)
def test_settings_that_would_put_nan_into_a_table_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_settings_at_the_edge_still_train_to_finite_rows():
    for optimizer in (
        opt.Adagrad(0.1, initial_accumulator_value=0.0),
        opt.Ftrl(0.1, initial_accumulator_value=0.0, l2_regularization_strength=0.1),
        opt.Adam(0.1, beta_1=0.0),
    ):
        table = tf_lora.SparseTable(2, optimizer=optimizer)
        table.push([1, 1, 2], [[0.5, 0.0], [0.5, 0.0], [0.0, 0.0]])
        assert np.isfinite(table.export()["values"].numpy()).all()


def test_not_a_table():
    from tf_lora.python.ops import sparse_table_ops

    var = tf.Variable(1.0)
    with pytest.raises(
        tf.errors.InvalidArgumentError, match="table must be the handle of a tf_lora SparseTable"
    ):
        sparse_table_ops.size(var.handle)


@pytest.mark.parametrize("dim", [0, -1, 2**20 + 1, 2**62])
def test_bad_dim(dim):
    with pytest.raises(ValueError, match=r"dim must be in \[1, 1048576\]"):
        tf_lora.SparseTable(dim)


def test_concurrent_pushes_from_threads_lose_nothing():
    table = tf_lora.SparseTable(2, optimizer=opt.SGD(1.0))
    push = tf.function(table.push)

    def worker(seed):
        rng = np.random.default_rng(seed)
        for _ in range(50):
            ids = rng.integers(0, 300, 128)
            push(ids, np.ones((128, 2), np.float32))
            table.pull(ids, training=True)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    contents = table.export()
    # Every pushed gradient of 1 moved its value by exactly -1: nothing lost, nothing applied twice.
    assert float(tf.reduce_sum(contents["values"])) == -2.0 * 4 * 50 * 128
    assert int(contents["step"]) == 4 * 50


# ---- Checkpoints ----


def _trained_table(dim=4, keys=1_000_000, seed=0):
    rng = np.random.default_rng(seed)
    table = tf_lora.SparseTable(dim, initializer=init.RandomNormal(seed=seed), optimizer=opt.Adagrad(0.1))
    ids = np.arange(keys, dtype=np.int64)
    table.pull(ids, training=True)
    hot = rng.integers(0, keys, 50_000)
    table.push(hot, rng.standard_normal((hot.size, dim)).astype(np.float32))
    return table


def test_checkpoint_round_trip_is_exact(tmp_path):
    table = _trained_table()
    before = _snapshot(table)
    path = tf.train.Checkpoint(table=table).write(str(tmp_path / "ckpt"))
    table.push([1, 2, 3], np.ones((3, 4), np.float32))  # changed after saving
    tf.train.Checkpoint(table=table).read(path).assert_consumed()
    _assert_same(before, _snapshot(table))
    # And into a new table of the same dim and optimizer.
    fresh = tf_lora.SparseTable(4, optimizer=opt.Adagrad(0.1))
    tf.train.Checkpoint(table=fresh).read(path).assert_consumed()
    _assert_same(before, _snapshot(fresh))
    assert int(fresh.size()) == 1_000_000


def test_restoring_into_another_dim_fails_and_leaves_table_unchanged(tmp_path):
    path = tf.train.Checkpoint(table=_trained_table(keys=1000)).write(str(tmp_path / "ckpt"))
    other = tf_lora.SparseTable(8, optimizer=opt.Adagrad(0.1))
    other.push([5], np.ones((1, 8), np.float32))
    before = _snapshot(other)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"values must have shape \[1000,8\]"):
        tf.train.Checkpoint(table=other).read(path)
    _assert_same(before, _snapshot(other))


SAVE_MODEL = """
import sys
import numpy as np, tensorflow as tf, tf_lora

class Model(tf.Module):
    def __init__(self):
        self.table = tf_lora.SparseTable(
            4, initializer=tf_lora.sparse_initializers.RandomNormal(seed=1),
            optimizer=tf_lora.sparse_optimizers.Adagrad(0.1))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64)])
    def serve(self, ids):
        return self.table.pull(ids)

m = Model()
m.table.pull(np.arange(100), training=True)
m.table.push(np.arange(10), np.ones((10, 4), np.float32))
np.save(sys.argv[2], m.serve(tf.constant(np.arange(120), tf.int64)).numpy())
tf.saved_model.save(m, sys.argv[1])
"""

LOAD_MODEL = """
import sys
import numpy as np, tensorflow as tf, tf_lora
m = tf.saved_model.load(sys.argv[1])
got = m.serve(tf.constant(np.arange(120), tf.int64)).numpy()
np.testing.assert_array_equal(got, np.load(sys.argv[2]))
assert not np.any(got[100:]), "unknown ids must read as zeros in inference mode"
print("SERVED_OK")
"""


def test_saved_model_serves_trained_values_in_a_fresh_process(tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    model, expected = str(tmp_path / "model"), str(tmp_path / "expected.npy")
    for script in (SAVE_MODEL, LOAD_MODEL):
        proc = subprocess.run(
            [sys.executable, "-c", script, model, expected],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SERVED_OK" in proc.stdout


OUT_OF_MEMORY = """
import numpy as np, tensorflow as tf, tf_lora
table = tf_lora.SparseTable(32)
old = np.arange(1000, dtype=np.int64) * 7919
table.push(old, np.full((1000, 32), 0.5, np.float32))
before = table.pull(old).numpy()
batch = 1 << 16
grads = tf.ones([batch, 32])
batches = [tf.constant(-1 - np.arange(b * batch, (b + 1) * batch, dtype=np.int64)) for b in range(64)]
table.push(batches[0][:10], grads[:10])
# 512 MiB more address space; 64 batches of new keys need about 600 MiB of rows alone.
try:
    with address_space_headroom(512 << 20):
        for ids in batches:
            table.push(ids, grads)
except tf.errors.ResourceExhaustedError as e:
    assert "SparseTablePush: out of memory inserting new ids" in str(e), str(e)
    print("RESOURCE_EXHAUSTED")
size = int(table.size())
assert len(table.export()["keys"]) == size
np.testing.assert_array_equal(table.pull(old).numpy(), before)
table.push(batches[-1], grads)
assert int(table.size()) > size
print("WHOLE_OK")
"""


def test_out_of_memory_is_an_error_and_the_table_stays_whole(run_python):
    # Run out of address space in a subprocess: the push fails with ResourceExhausted instead of killing
    # the process (a std::bad_alloc on a worker thread would), the keys the table had keep their rows,
    # its size matches its contents, and it grows again once memory is back.
    stdout = run_python(OUT_OF_MEMORY)
    assert "RESOURCE_EXHAUSTED" in stdout and "WHOLE_OK" in stdout, stdout


# ---- Removal and eviction ----


def test_remove_and_evict():
    table = tf_lora.SparseTable(2, initializer=init.RandomUniform(seed=4), optimizer=opt.SGD(0.1))
    ids = np.arange(100, dtype=np.int64)
    rows = table.pull(ids, training=True).numpy()
    assert int(table.remove([3, 5, 5, 1000])) == 2
    np.testing.assert_array_equal(table.pull([3, 5]), np.zeros((2, 2)))
    keep = np.setdiff1d(ids, [3, 5])
    np.testing.assert_array_equal(table.pull(keep), rows[keep])
    # Push 10 ids twice and 10 others once (pushing re-inserts the removed 3 and 5: 100 ids again);
    # evict by update count keeps the first 10.
    table.push(np.arange(10), np.ones((10, 2), np.float32))
    table.push(np.arange(20), np.ones((20, 2), np.float32))
    assert int(table.size()) == 100
    assert int(table.evict(min_update_count=2)) == 90
    assert sorted(table.export()["keys"].numpy()) == list(range(10))
    # Age: ids 0-4 pushed now, 5-9 one push ago; max_age 0 evicts 5-9.
    table.push(np.arange(5), np.ones((5, 2), np.float32))
    assert int(table.evict(max_age=0)) == 5 and int(table.size()) == 5
    with pytest.raises(ValueError, match="max_age must be >= 0 or None"):
        table.evict(max_age=-3)


def test_remove_and_evict_after_import():
    """An imported table knows which key each row holds: removing and evicting there is exact."""
    table = tf_lora.SparseTable(2, optimizer=opt.SGD(0.1))
    table.pull([999], training=True)  # contents the import replaces
    keys = np.arange(50, dtype=np.int64) * 7
    values = np.random.default_rng(0).standard_normal((50, 2)).astype(np.float32)
    counts = np.where(np.arange(50) < 20, 3, 1).astype(np.int64)
    table.import_(
        {
            "keys": keys,
            "values": values,
            "slots": np.zeros((50, 0), np.float32),
            "update_counts": counts,
            "last_steps": np.zeros(50, np.int64),
            "step": 0,
        }
    )
    assert int(table.remove(keys[:5])) == 5
    np.testing.assert_array_equal(table.pull(keys[5:]), values[5:])
    assert int(table.evict(min_update_count=2)) == 30
    assert sorted(table.export()["keys"].numpy()) == sorted(keys[5:20])
    np.testing.assert_array_equal(table.pull(keys[5:20]), values[5:20])
    np.testing.assert_array_equal(table.pull([999]), np.zeros((1, 2)))


def test_gradients_stop_at_the_table_ops():
    """tf.gradients through a pull in graph mode: None for what only the table feeds, no LookupError."""
    table = tf_lora.SparseTable(3)

    @tf.function
    def grads(w):
        handle = tf.identity(table.resource_handle)
        rows = tf_lora.python.ops.sparse_table_ops.pull(handle, [1, 2], dim=3, training=True)
        y = tf.reduce_sum(rows * w) + tf.reduce_sum(w)
        dw, dhandle = tf.gradients(y, [w, handle])  # through the pull back to its table input
        assert dhandle is None
        return dw

    np.testing.assert_array_equal(grads(tf.ones([2, 3])), np.ones((2, 3)))  # rows are zeros: d/dw = rows + 1


def test_deleting_a_table_frees_it_and_a_copy_never_does(tmp_path):
    # A deleted table stayed in the op library's resource manager for the life of the process (each
    # 500k x 16 table kept ~100 MB): notebooks and sweeps ran out of memory.
    table = tf_lora.SparseTable(4)
    table.pull(np.arange(10), training=True)
    duplicate = copy.copy(table)  # as SavedModel export copies it
    del duplicate
    gc.collect()
    assert int(table.size()) == 10

    class Serving(tf.Module):
        def __init__(self, table):
            super().__init__()
            self.table = table

        @tf.function(input_signature=[tf.TensorSpec([None], tf.int64)])
        def lookup(self, ids):
            return self.table.pull(ids)

    tf.saved_model.save(Serving(table), str(tmp_path / "served"))
    loaded = tf.saved_model.load(str(tmp_path / "served"))
    del loaded
    gc.collect()
    assert int(table.size()) == 10

    handle = table.resource_handle
    del table
    gc.collect()
    with pytest.raises(tf.errors.OpError):
        sparse_table_ops.size(handle)


def test_a_table_in_a_keras_model_is_freed_with_the_model():
    # Keras layers sit in reference cycles: the garbage collector clears weak references before it runs
    # __del__, so a creator kept by weak reference never freed a layer's table.
    ids = keras.Input((2,), dtype="int64")
    model = keras.Model(ids, tf_lora.layers.SparseEmbedding(4, combiner="sum")(ids))
    model.predict(np.arange(6).reshape(3, 2), verbose=0)
    layer = model.layers[-1]
    layer.table.pull(np.arange(10), training=True)
    handle = layer.table.resource_handle
    assert int(sparse_table_ops.size(handle)) == 10
    del model, layer, ids  # (the input holds the layer through its graph too)
    gc.collect()
    with pytest.raises(tf.errors.OpError):
        sparse_table_ops.size(handle)
