"""tf_lora.ShardedSparseTable: one table over several devices, the parameter servers of a TensorFlow cluster;
it must read and train exactly as one SparseTable."""

import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_lora

OPTIMIZERS = {
    "sgd": lambda: tf_lora.sparse_optimizers.SGD(0.1),
    "adagrad": lambda: tf_lora.sparse_optimizers.Adagrad(0.1),
    "adam": lambda: tf_lora.sparse_optimizers.Adam(0.01),
    "ftrl": lambda: tf_lora.sparse_optimizers.Ftrl(0.1, l1_regularization_strength=0.01),
}


def _sorted(contents):
    order = np.argsort(contents["keys"].numpy())
    return {k: (v.numpy()[order] if k != "step" else int(v)) for k, v in contents.items()}


def _assert_same(one, sharded):
    a, b = _sorted(one.export()), _sorted(sharded.export())
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_three_shards_train_exactly_as_one_table(optimizer):
    init = tf_lora.sparse_initializers.RandomNormal(stddev=0.1, seed=3)
    one = tf_lora.SparseTable(4, init, OPTIMIZERS[optimizer]())
    sharded = tf_lora.ShardedSparseTable(4, ["/cpu:0"] * 3, init, OPTIMIZERS[optimizer]())
    rng = np.random.default_rng(0)
    for _ in range(6):  # repeated ids, negative ids, and ids only some shards get
        ids = rng.integers(-20, 20, (6, 3)).astype(np.int64)
        grads = rng.standard_normal((6, 3, 4)).astype(np.float32)
        np.testing.assert_array_equal(one.pull(ids, training=True), sharded.pull(ids, training=True))
        one.push(ids, grads)
        sharded.push(ids, grads)
    one.push([7], np.ones((1, 4), np.float32))  # only shard 1 has ids: every shard's step still advances
    sharded.push([7], np.ones((1, 4), np.float32))
    _assert_same(one, sharded)
    assert all(int(table.size()) > 0 for table in sharded.shards)
    assert int(one.size()) == int(sharded.size())
    assert int(one.evict(min_update_count=2, max_age=3)) == int(sharded.evict(min_update_count=2, max_age=3))
    assert int(one.remove([1, 2, 3, 1000])) == int(sharded.remove([1, 2, 3, 1000]))
    _assert_same(one, sharded)
    for ids in [np.zeros((0, 3), np.int64), np.array(5, np.int64), np.arange(-25, 25).reshape(2, 5, 5)]:
        np.testing.assert_array_equal(one.pull(ids), sharded.pull(ids))


def test_checkpoints_import_and_a_refused_import(tmp_path):
    init = tf_lora.sparse_initializers.RandomUniform(-1, 1, seed=5)
    sharded = tf_lora.ShardedSparseTable(
        3, ["/cpu:0", "/cpu:0"], init, tf_lora.sparse_optimizers.Adagrad(0.1)
    )
    ids = np.arange(-10, 30, dtype=np.int64)
    sharded.pull(ids, training=True)
    sharded.push(ids, np.ones((40, 3), np.float32))
    path = tf.train.Checkpoint(table=sharded).write(str(tmp_path / "ckpt"))
    restored = tf_lora.ShardedSparseTable(
        3, ["/cpu:0", "/cpu:0"], init, tf_lora.sparse_optimizers.Adagrad(0.1)
    )
    tf.train.Checkpoint(table=restored).read(path).assert_consumed()
    _assert_same(sharded, restored)

    # An export of one layout imports into another (here three shards, and one table).
    three = tf_lora.ShardedSparseTable(3, ["/cpu:0"] * 3, init, tf_lora.sparse_optimizers.Adagrad(0.1))
    three.import_(sharded.export())
    _assert_same(sharded, three)
    one = tf_lora.SparseTable(3, init, tf_lora.sparse_optimizers.Adagrad(0.1))
    one.import_(three.export())
    _assert_same(one, three)

    # A NaN in the last shard's rows: refused, and the shards imported before it get their contents back.
    bad = {k: v.numpy().copy() for k, v in sharded.export().items()}
    bad["keys"] = np.arange(len(bad["keys"]), dtype=np.int64) + 100  # new ids, on all three shards
    bad["values"][bad["keys"] % 3 == 2] = np.nan
    before = _sorted(three.export())
    with pytest.raises(tf.errors.InvalidArgumentError, match="SparseTableImport"):
        three.import_(bad)
    after = _sorted(three.export())
    for name in before:
        np.testing.assert_array_equal(before[name], after[name])
    with pytest.raises(tf.errors.InvalidArgumentError, match="slots must have a row per key"):
        three.import_({**bad, "slots": bad["slots"][:-1]})


def _trained_two_shard_model(seed, x):
    """A model over a SparseEmbedding of two shards ("emb"), fit on `x` once: (model, layer)."""
    keras.utils.set_random_seed(seed)
    ids = keras.Input((2,), dtype="int64")
    emb = tf_lora.layers.SparseEmbedding(4, combiner="sum", devices=["/cpu:0", "/cpu:0"], name="emb")
    model = keras.Model(ids, keras.layers.Dense(1)(emb(ids)))
    model.compile(optimizer="sgd", loss="mse")
    model.fit(x, np.ones((len(x), 1)), verbose=0)
    return model, emb


def test_a_sharded_keras_layer_saves_and_loads_as_keras_files_do(tmp_path):
    x = np.arange(40, dtype=np.int64).reshape(20, 2)
    model, emb = _trained_two_shard_model(1, x)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    table = loaded.get_layer("emb").table
    assert isinstance(table, tf_lora.ShardedSparseTable) and len(table.shards) == 2
    _assert_same(emb.table, table)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_a_keras_file_trained_on_parameter_servers_loads_where_there_are_none(tmp_path):
    # A .keras file whose layers' devices this process lacks failed in the table's op with TensorFlow's
    # placement error; sparse_table_devices places the tables here (or on other devices) instead.
    x = np.arange(-20, 20, dtype=np.int64).reshape(20, 2)
    model, emb = _trained_two_shard_model(2, x)
    model.save(tmp_path / "local.keras")
    with (
        zipfile.ZipFile(tmp_path / "local.keras") as local,
        zipfile.ZipFile(tmp_path / "ps.keras", "w") as ps,
    ):
        for name in local.namelist():  # as written by a worker of a cluster with two parameter servers
            data = local.read(name)
            if name == "config.json":
                data = data.replace(b'["/cpu:0", "/cpu:0"]', b'["/job:ps/task:0", "/job:ps/task:1"]')
                assert b"/job:ps/task:1" in data
            ps.writestr(name, data)
    with pytest.raises(
        ValueError, match=r"'emb': this process has no device '/job:ps/task:0'.*sparse_table_devices"
    ):
        keras.models.load_model(tmp_path / "ps.keras")
    for devices in (None, ["/cpu:0"] * 3):
        with tf_lora.layers.sparse_table_devices(devices):
            loaded = keras.models.load_model(tmp_path / "ps.keras")
        table = loaded.get_layer("emb").table
        assert loaded.get_layer("emb").devices == devices
        assert len(getattr(table, "shards", [table])) == (1 if devices is None else 3)
        _assert_same(emb.table, table)
        np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    assert keras.models.load_model(tmp_path / "local.keras").get_layer("emb").devices == ["/cpu:0"] * 2
    with pytest.raises(ValueError, match="devices must be a list of devices or None, got '/cpu:0'"):
        with tf_lora.layers.sparse_table_devices("/cpu:0"):
            pass


def test_a_non_finite_push_changes_nothing(tmp_path):
    # A NaN in one shard's gradient was refused by that shard only: the other shards took the push and their
    # steps parted.
    sharded = tf_lora.ShardedSparseTable(
        2, ["/cpu:0", "/cpu:0"], optimizer=tf_lora.sparse_optimizers.SGD(1.0)
    )
    sharded.push([0, 1], np.ones((2, 2), np.float32))
    before = [_sorted(table.export()) for table in sharded.shards]
    grads = np.array([[1, 1], [np.nan, 1], [1, 1]], np.float32)
    with pytest.raises(tf.errors.InvalidArgumentError, match="the gradient of id.*1.*is not finite"):
        sharded.push([0, 1, 2], grads)
    for table, old in zip(sharded.shards, before, strict=True):
        for name, value in _sorted(table.export()).items():
            np.testing.assert_array_equal(value, old[name])


def test_bad_arguments():
    with pytest.raises(ValueError, match="devices must be a non-empty list of devices"):
        tf_lora.ShardedSparseTable(4, "/cpu:0")
    with pytest.raises(ValueError, match="devices must be a non-empty list of devices"):
        tf_lora.ShardedSparseTable(4, [])
    with pytest.raises(TypeError, match="ShardedSparseTable.pull: ids must be int64, got float32"):
        tf_lora.ShardedSparseTable(4, ["/cpu:0"]).pull(tf.constant([1.0]))
    with pytest.raises(ValueError, match=r"dim must be in \[1, 1048576\]"):
        tf_lora.ShardedSparseTable(0, ["/cpu:0"])
    with pytest.raises(ValueError, match="devices must be a non-empty list of devices, got '/cpu:0'"):
        tf_lora.layers.SparseEmbedding(4, devices="/cpu:0")
    table = tf_lora.ShardedSparseTable(4, ["/cpu:0", "/cpu:0"])
    with pytest.raises(ValueError, match=r"grads must be ids.shape \+ \[dim\] = \(2, 4\), got \(3, 2, 4\)"):
        table.push([2, 3], np.ones((3, 2, 4), np.float32))
    with pytest.raises(
        tf.errors.InvalidArgumentError, match="learning_rate must be finite and >= 0, got -1.0"
    ):
        table.push([2, 3], np.ones((2, 4), np.float32), learning_rate=-1.0)
    assert [int(shard.export()["step"]) for shard in table.shards] == [0, 0]
    keras_adam = tf_lora.ShardedSparseTable(4, ["/cpu:0"], optimizer=keras.optimizers.Adam(0.01))
    assert isinstance(keras_adam.optimizer, tf_lora.sparse_optimizers.Adam)  # translated, as a layer does
    with pytest.raises(ValueError, match="keys must be a vector"):
        table.import_({**table.export(), "keys": np.zeros((0, 1), np.int64)})


# Two parameter servers in this process's cluster; the test process is the worker (TensorFlow's distributed
# runtime, over gRPC on localhost). Run in a fresh interpreter: connecting changes the process's devices.
_CLUSTER = """
import socket
import numpy as np, tensorflow as tf, keras, tf_lora

def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]

spec = {"worker": [f"localhost:{free_port()}"], "ps": [f"localhost:{free_port()}" for _ in range(2)]}
cluster = tf.train.ClusterSpec(spec)
servers = [tf.distribute.Server(cluster, job_name="ps", task_index=k, start=True) for k in range(2)]
tf.config.experimental_connect_to_cluster(cluster, job_name="worker", task_index=0)
PS = ["/job:ps/task:0", "/job:ps/task:1"]
"""


def test_a_table_on_two_parameter_servers_trains_a_keras_model_as_one_local_table(tmp_path, run_python):
    out = run_python(
        _CLUSTER
        + f"""
def model(devices):
    keras.utils.set_random_seed(0)
    ids = keras.Input((3,), dtype="int64")
    emb = tf_lora.layers.SparseEmbedding(8, combiner="mean", devices=devices, name="emb")
    out = keras.layers.Dense(1)(emb(ids))
    m = keras.Model(ids, out)
    m.compile(optimizer="adam", loss="mse")
    return m, emb

rng = np.random.default_rng(0)
x = rng.integers(0, 10_000, (256, 3))
y = rng.standard_normal((256, 1))
remote, remote_emb = model(PS)
local, local_emb = model(None)
print([t.resource_handle.device for t in remote_emb.table.shards])
for m in (remote, local):
    m.fit(x, y, epochs=2, batch_size=32, verbose=0)
np.testing.assert_allclose(remote.predict(x, verbose=0), local.predict(x, verbose=0), rtol=1e-6, atol=1e-7)
a, b = remote_emb.table.export(), local_emb.table.export()
order_a, order_b = np.argsort(a["keys"].numpy()), np.argsort(b["keys"].numpy())
for name in ("keys", "values", "slots", "update_counts", "last_steps"):
    np.testing.assert_array_equal(a[name].numpy()[order_a], b[name].numpy()[order_b])
print([int(t.size()) for t in remote_emb.table.shards], int(local_emb.table.size()))

# A checkpoint of the remote model restores into another one on the same servers.
path = tf.train.Checkpoint(model=remote).write({str(tmp_path / "ckpt")!r})
again, again_emb = model(PS)
tf.train.Checkpoint(model=again).read(path).assert_existing_objects_matched()
np.testing.assert_allclose(again.predict(x, verbose=0), remote.predict(x, verbose=0), rtol=1e-6, atol=1e-7)
# ... into a local model (the shards gathered), and a local model's into the servers' shards.
moved, _ = model(None)
tf.train.Checkpoint(model=moved).read(path)
np.testing.assert_allclose(moved.predict(x, verbose=0), remote.predict(x, verbose=0), rtol=1e-6, atol=1e-7)
local_path = tf.train.Checkpoint(model=local).write({str(tmp_path / "local")!r})
spread, spread_emb = model(PS)
tf.train.Checkpoint(model=spread).read(local_path)
assert min(int(t.size()) for t in spread_emb.table.shards) > 0
np.testing.assert_allclose(spread.predict(x, verbose=0), local.predict(x, verbose=0), rtol=1e-6, atol=1e-7)
# A table's checkpoint on the servers into another number of shards there: TensorFlow restores values
# spread over several tasks in a tf.function, where this was refused.
adagrad = tf_lora.sparse_optimizers.Adagrad(0.1)
on_two = tf_lora.ShardedSparseTable(3, PS, optimizer=adagrad)
on_two.push(np.arange(-30, 30), np.arange(180, dtype=np.float32).reshape(60, 3))
table_path = tf.train.Checkpoint(table=on_two).write({str(tmp_path / "table")!r})
for devices in ([PS[0], PS[1], PS[0]], [PS[1]]):
    moved_table = tf_lora.ShardedSparseTable(3, devices, optimizer=adagrad)
    tf.train.Checkpoint(table=moved_table).read(table_path)
    a, b = on_two.export(), moved_table.export()
    order_a, order_b = np.argsort(a["keys"].numpy()), np.argsort(b["keys"].numpy())
    for name in ("keys", "values", "slots", "update_counts", "last_steps"):
        np.testing.assert_array_equal(a[name].numpy()[order_a], b[name].numpy()[order_b])
    assert int(a["step"]) == int(b["step"])
print("resharded")
remote.export({str(tmp_path / "export")!r}, verbose=False)
np.save({str(tmp_path / "x.npy")!r}, x[:16])
np.save({str(tmp_path / "expected.npy")!r}, remote.predict(x[:16], verbose=0))

# A refused import on the servers (whose eager ops run asynchronously) leaves every shard as it was.
table = tf_lora.ShardedSparseTable(2, PS, optimizer=tf_lora.sparse_optimizers.SGD(1.0))
table.pull(np.arange(4), training=True)
bad = {{k: v.numpy() for k, v in table.export().items()}}
bad["keys"] = bad["keys"] + 100
bad["values"][bad["keys"] % 2 == 0] = np.nan  # shard 0 refuses its part
try:
    table.import_(bad)
    print("imported")
except tf.errors.InvalidArgumentError:
    print(sorted(table.export()["keys"].numpy().tolist()))
print("done")
"""
    )
    lines = out.strip().splitlines()
    assert lines[0] == "['/job:ps/replica:0/task:0/device:CPU:0', '/job:ps/replica:0/task:1/device:CPU:0']"
    sizes, total = lines[1].rsplit("] ", 1)
    sizes = [int(s) for s in sizes.strip("[").split(",")]
    assert sum(sizes) == int(total) and min(sizes) > 0  # both servers hold ids
    assert lines[-2:] == ["[0, 1, 2, 3]", "done"] and "resharded" in lines

    # Trained on the cluster, served anywhere: densified, the export runs in stock TensorFlow.
    tf_lora.rewrite.densify(tmp_path / "export", tmp_path / "served")
    loaded = tf.saved_model.load(str(tmp_path / "served"))
    got = loaded.signatures["serving_default"](tf.constant(np.load(tmp_path / "x.npy")))
    np.testing.assert_allclose(
        next(iter(got.values())).numpy(), np.load(tmp_path / "expected.npy"), rtol=1e-5
    )


@pytest.mark.parametrize("loss_scale", [False, True])
def test_parameter_server_strategy_trains_a_sparse_embedding_as_one_local_table(run_python, loss_scale):
    # ParameterServerStrategy's ClusterCoordinator: a custom loop whose steps the coordinator schedules on a
    # worker (in this process's cluster: a worker and two parameter servers), the table sharded over the
    # servers; the same steps locally must give the same losses and table. With a LossScaleOptimizer, the
    # step is applied in one branch of its condition and skipped in the other.
    out = run_python(
        f"LOSS_SCALE = {loss_scale}\n"
        + """
import socket
import numpy as np, tensorflow as tf, keras, tf_lora

def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]

spec = {
    "chief": [f"localhost:{free_port()}"],
    "worker": [f"localhost:{free_port()}"],
    "ps": [f"localhost:{free_port()}" for _ in range(2)],
}
cluster = tf.train.ClusterSpec(spec)
servers = [tf.distribute.Server(cluster, job_name="worker", task_index=0, start=True)]
servers += [tf.distribute.Server(cluster, job_name="ps", task_index=k, start=True) for k in range(2)]
resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
    cluster, task_type="chief", task_id=0, rpc_layer="grpc"
)
strategy = tf.distribute.ParameterServerStrategy(resolver)
coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)

def build(devices):
    keras.utils.set_random_seed(0)
    ids = keras.Input((3,), dtype="int64")
    emb = tf_lora.layers.SparseEmbedding(
        4, combiner="sum", devices=devices, optimizer=tf_lora.sparse_optimizers.Adagrad(0.1), name="emb"
    )
    optimizer = keras.optimizers.Adam(0.01)
    if LOSS_SCALE:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return keras.Model(ids, keras.layers.Dense(1)(emb(ids))), emb, optimizer

def train_step(model, optimizer, x, y):
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean((model(x, training=True) - y) ** 2)
        scaled = optimizer.scale_loss(loss)
    grads = tape.gradient(scaled, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return loss

rng = np.random.default_rng(0)
x = rng.integers(-100, 100, (64, 3)).astype(np.int64)
y = rng.standard_normal((64, 1)).astype(np.float32)
with strategy.scope():
    remote, remote_emb, remote_opt = build(["/job:ps/task:0", "/job:ps/task:1"])

@tf.function
def step(xb, yb):
    return strategy.run(lambda a, b: train_step(remote, remote_opt, a, b), args=(xb, yb))

local, local_emb, local_opt = build(None)
for k in range(0, 64, 16):
    result = coordinator.schedule(step, args=(tf.constant(x[k : k + 16]), tf.constant(y[k : k + 16])))
    coordinator.join()
    expected = float(train_step(local, local_opt, x[k : k + 16], y[k : k + 16]))
    np.testing.assert_allclose(float(result.fetch()), expected, rtol=1e-6)
a, b = remote_emb.table.export(), local_emb.table.export()
order_a, order_b = np.argsort(a["keys"].numpy()), np.argsort(b["keys"].numpy())
for name in ("keys", "values", "slots", "update_counts", "last_steps"):
    np.testing.assert_array_equal(a[name].numpy()[order_a], b[name].numpy()[order_b])
# The ids a step reads stay in its function: the layer's list, one variable on the servers for all workers
# (which running steps at once overwrote, pushing gradients into other steps' ids), is left alone.
assert int(tf.convert_to_tensor(remote_emb._step.count)) == 0
# An optimizer step in another function than the training call has no ids to push: a clear error.
with strategy.scope():
    grads_var = tf.Variable(tf.zeros_like(remote_emb.pulled_rows), trainable=False)

@tf.function
def apply_elsewhere():
    grads = [(tf.ones_like(grads_var), remote_emb.pulled_rows)]
    return strategy.run(lambda: remote_opt.apply_gradients(grads))

try:
    coordinator.schedule(apply_elsewhere)
    coordinator.join()
    print("applied")
except ValueError as e:
    print("refused:", " ".join(str(e).split()).split("emb: ")[-1].split(";")[0])
print([t.resource_handle.device for t in remote_emb.table.shards], len(a["keys"]))
"""
    )
    assert (
        "refused: under ParameterServerStrategy, the optimizer step must run in the same tf.function as the "
        "training calls it applies" in out
    )
    assert (
        out.strip()
        .splitlines()[-1]
        .startswith("['/job:ps/replica:0/task:0/device:CPU:0', '/job:ps/replica:0/task:1/device:CPU:0'] ")
    )
