"""tf_lora.rewrite.densify and `tf-lora densify`: sparse tables become variables read by core ops, so stock
TensorFlow (no tf_lora) serves the model with the same outputs."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_lora
from tf_lora.rewrite import RewriteError, cli
from tf_lora.rewrite.model_files import ModelFiles

I64 = np.iinfo(np.int64)


def _numpy_pull(contents, ids, dim, min_update_count=0):
    """What an inference pull reads: a held id's row, zeros for any other id."""
    kept = contents["update_counts"] >= min_update_count
    rows = dict(zip(contents["keys"][kept].tolist(), contents["values"][kept], strict=True))
    flat = [rows.get(i, np.zeros(dim, np.float32)) for i in np.asarray(ids).ravel().tolist()]
    return np.asarray(flat, np.float32).reshape(*np.shape(ids), dim)


def _plugin_ops(path):
    meta = ModelFiles(path).meta
    used = {n.op for f in meta.graph_def.library.function for n in f.node_def} | {
        n.op for n in meta.graph_def.node
    }
    return sorted(op for op in used if op.startswith("TfLora"))


class Lookup(tf.Module):
    """A table read by a nested function, ids of any rank with a trailing pair axis."""

    def __init__(self, contents, dim=3):
        super().__init__()
        self.table = tf_lora.SparseTable(dim, name="features")
        if contents is not None:
            self.table.import_(contents)
        self.w = tf.Variable(np.arange(dim, dtype=np.float32) + 1.0)

    @tf.function
    def _rows(self, ids):
        return self.table.pull(ids)

    @tf.function(input_signature=[tf.TensorSpec([None, None, 2], tf.int64)])
    def __call__(self, ids):
        rows = self._rows(ids)
        return {"rows": rows, "score": tf.reduce_sum(rows * self.w, axis=-1)}


def _contents(keys, dim=3, counts=None):
    keys = np.asarray(keys, np.int64)
    rng = np.random.default_rng(1)
    n = len(keys)
    return {
        "keys": keys,
        "values": rng.standard_normal((n, dim)).astype(np.float32),
        "slots": np.zeros((n, 0), np.float32),
        "update_counts": np.asarray(counts if counts is not None else np.ones(n), np.int64),
        "last_steps": np.zeros(n, np.int64),
        "step": np.array(1, np.int64),
    }


def _save(module, path):
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.__call__})
    return path


# Extreme ids held by the table (int64's ends, -1, 0) and a spread of others, unsorted.
HELD = [I64.max, 0, -1, I64.min, 5, 1 << 40, 77, -(1 << 50), 3]


@pytest.mark.parametrize("min_update_count", [0, 2])
def test_densified_lookup_matches_numpy_for_held_left_out_and_unheld_ids(tmp_path, min_update_count):
    contents = _contents(HELD, counts=[1, 2, 3, 1, 2, 5, 1, 2, 9])
    module = Lookup(contents)
    src = _save(module, tmp_path / "model")
    report = tf_lora.rewrite.densify(src, tmp_path / "out", min_update_count=min_update_count).tables
    left_out = int(np.sum(contents["update_counts"] < min_update_count))
    assert [(d.table, d.name, d.dim, d.ids, d.left_out) for d in report] == [
        ("table", "features", 3, len(HELD) - left_out, left_out)
    ]
    # The nested function's traces: the one the signature calls, and the one saved as `_rows`.
    assert len(report[0].lookups) == 2 and all("_rows_" in x for x in report[0].lookups)
    assert _plugin_ops(tmp_path / "out") == []
    assert b"TfLora" not in (tmp_path / "out" / "saved_model.pb").read_bytes()  # not even in node names

    loaded = tf.saved_model.load(str(tmp_path / "out"))
    rng = np.random.default_rng(0)
    unheld = [1, -2, I64.max - 1, I64.min + 1, 4, 6]
    for shape in [(2, 3, 2), (1, 1, 2), (0, 4, 2), (3, 0, 2)]:
        ids = rng.choice(np.array(HELD + unheld, np.int64), shape)
        got = loaded.signatures["serving_default"](ids=tf.constant(ids, tf.int64))
        expected = _numpy_pull(contents, ids, 3, min_update_count)
        np.testing.assert_array_equal(got["rows"].numpy(), expected)
        np.testing.assert_allclose(got["score"].numpy(), expected @ module.w.numpy(), rtol=1e-6)
    if min_update_count == 0:  # the plugin reads exactly the same
        ids = rng.choice(np.array(HELD + unheld, np.int64), (4, 5, 2))
        np.testing.assert_array_equal(
            loaded.signatures["serving_default"](ids=ids)["rows"], module(tf.constant(ids))["rows"]
        )


def test_an_empty_table_reads_zeros(tmp_path, run_python):
    src = _save(Lookup(None), tmp_path / "model")
    (report,) = tf_lora.rewrite.densify(src, tmp_path / "out").tables
    assert (report.ids, report.left_out, report.keys) == (0, 0, None)
    served = run_python(
        f"""
import sys
sys.modules["tf_lora"] = None
import numpy as np, tensorflow as tf
loaded = tf.saved_model.load({str(tmp_path / "out")!r})
ids = np.array([[[0, -1], [{I64.max}, {I64.min}]]], np.int64)
print(loaded.signatures["serving_default"](ids=ids)["rows"].numpy().tolist())
"""
    )
    assert np.array_equal(eval(served), np.zeros((1, 2, 2, 3)))  # noqa: S307 - our own subprocess's list

    # A table that min_update_count empties reads zeros too.
    src = _save(Lookup(_contents([4, 7], counts=[1, 2])), tmp_path / "small")
    (report,) = tf_lora.rewrite.densify(src, tmp_path / "emptied", min_update_count=3).tables
    assert (report.ids, report.left_out) == (0, 2)
    loaded = tf.saved_model.load(str(tmp_path / "emptied"))
    rows = loaded.signatures["serving_default"](ids=[[[4, 7]]])["rows"]
    np.testing.assert_array_equal(rows, np.zeros((1, 1, 2, 3)))


def _recommender(tmp_path):
    """A Keras two-tower-ish model: a user id and three item ids (mean), trained by fit, then exported."""
    keras.utils.set_random_seed(3)
    user = keras.Input((), dtype="int64", name="user")
    items = keras.Input((3,), dtype="int64", name="items")
    u = tf_lora.layers.SparseEmbedding(8, name="user_table")(user)
    i = tf_lora.layers.SparseEmbedding(8, combiner="mean", name="item_table")(items)
    hidden = keras.layers.Dense(16, activation="relu")(keras.layers.Concatenate()([u, i]))
    model = keras.Model([user, items], keras.layers.Dense(1)(hidden))
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(0)
    x = [rng.integers(0, 300, 512) * 1_000_003, rng.integers(0, 1500, (512, 3))]
    model.fit(x, rng.standard_normal((512, 1)), epochs=2, batch_size=64, verbose=0)
    model.export(str(tmp_path / "model"), verbose=False)
    return model, x


def test_keras_export_densified_serves_in_a_process_without_tf_lora(tmp_path, capsys, run_python):
    model, x = _recommender(tmp_path)
    src = tmp_path / "model"
    info = tf_lora.rewrite.inspect(src)
    assert sorted((t["name"], t["dim"], len(t["pulls"]), t["other_uses"]) for t in info["sparse_tables"]) == [
        ("item_table", 8, 1, []),
        ("user_table", 8, 1, []),
    ]
    args = ["densify", str(src), str(tmp_path / "out"), "--verify", "--json", "--min-update-count", "3"]
    assert cli.main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] and result["verify"]["max_difference"] == {"serve": 0.0, "serving_default": 0.0}
    by_name = {d["name"]: d for d in result["densified"]}
    tables = {layer.name: layer.table.export() for layer in model.layers if hasattr(layer, "table")}
    for name, contents in tables.items():
        held = contents["keys"].numpy()
        counts = contents["update_counts"].numpy()
        assert by_name[name]["ids"] == int(np.sum(counts >= 3)) and by_name[name]["left_out"] == int(
            np.sum(counts < 3)
        )
        assert by_name[name]["left_out"] > 0 and len(held) > 50  # the threshold has something to do
    assert tf_lora.rewrite.inspect(tmp_path / "out")["sparse_tables"] == []
    # The layers' pulled_rows (zeros for training, max_ids_per_step * dim floats each) stay out of it.
    assert not [
        v.name for v in tf.saved_model.load(str(tmp_path / "out")).variables if "pulled_rows" in v.name
    ]
    assert _size(tmp_path / "out") < _size(src) / 10

    # One table of the two (Keras keeps them in a list, which must stay a list), with tf_lora loaded.
    assert cli.main(["densify", str(src), str(tmp_path / "one"), "--table", "user_table", "--verify"]) == 0
    assert [t["name"] for t in tf_lora.rewrite.inspect(tmp_path / "one")["sparse_tables"]] == ["item_table"]
    capsys.readouterr()

    # Ids the tables hold (and ones they left out, and never held), through a fresh process that cannot
    # import tf_lora: stock TensorFlow loads and runs the densified model.
    user = np.concatenate([x[0][:20], [-1, I64.max, 7]]).astype(np.int64)
    items = np.concatenate([x[1][:20], [[-1, 0, I64.min], [1 << 45, 3, 3], [0, 0, 0]]]).astype(np.int64)
    np.save(tmp_path / "user.npy", user)
    np.save(tmp_path / "items.npy", items)
    served = run_python(
        f"""
import sys
sys.modules["tf_lora"] = None  # importing it fails
import numpy as np, tensorflow as tf
loaded = tf.saved_model.load({str(tmp_path / "out")!r})
user, items = (tf.constant(np.load(f"{tmp_path}/{{name}}.npy")) for name in ("user", "items"))
out = loaded.signatures["serving_default"](user=user, items=items)
np.save({str(tmp_path / "served.npy")!r}, next(iter(out.values())).numpy())
from tensorflow.python.framework import op_def_registry
print(sorted(m for m in sys.modules if "lora" in m and sys.modules[m]))
print(op_def_registry.get("TfLora>SparseTablePull"))
# TF Serving's way: a session, the checkpoint restored, then the init op (which fills the hash tables).
with tf.compat.v1.Session(graph=tf.Graph()) as session:
    meta = tf.compat.v1.saved_model.loader.load(session, ["serve"], {str(tmp_path / "out")!r})
    signature = meta.signature_def["serving_default"]
    feeds = {{signature.inputs[k].name: np.load(f"{tmp_path}/{{k}}.npy") for k in ("user", "items")}}
    (output,) = signature.outputs.values()
    np.save({str(tmp_path / "session.npy")!r}, session.run(output.name, feeds))
"""
    )
    assert served.split() == ["[]", "None"]  # no tf_lora module, no tf_lora op registered
    # The reference: the model itself, its tables evicted below the threshold (what --min-update-count keeps).
    for layer in model.layers:
        if hasattr(layer, "table"):
            layer.table.evict(min_update_count=3)
    expected = model.predict([user, items], verbose=0)
    np.testing.assert_allclose(np.load(tmp_path / "served.npy"), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.load(tmp_path / "session.npy"), np.load(tmp_path / "served.npy"))


def test_a_keras_model_with_sharded_tables_densifies(tmp_path):
    # The layers' pulled_rows were looked for under the shards' names (emb_shard_0/pulled_rows), never
    # found, and kept; and the tables' restore functions, which branch, counted as model uses of the tables.
    keras.utils.set_random_seed(5)
    ids = keras.Input((3,), dtype="int64")
    emb = tf_lora.layers.SparseEmbedding(4, combiner="sum", devices=["/cpu:0"] * 2, name="emb")
    model = keras.Model(ids, keras.layers.Dense(1)(emb(ids)))
    model.compile(optimizer="adam", loss="mse")
    x = np.random.default_rng(0).integers(-500, 500, (256, 3))
    model.fit(x, np.ones((256, 1)), batch_size=32, verbose=0)
    model.export(str(tmp_path / "model"), verbose=False)
    report = tf_lora.rewrite.densify(tmp_path / "model", tmp_path / "out")
    assert sorted(t.name for t in report.tables) == ["emb_shard_0", "emb_shard_1"]
    assert _plugin_ops(tmp_path / "out") == []
    shapes = [
        shape for _, shape in tf.train.list_variables(str(tmp_path / "out" / "variables" / "variables"))
    ]
    assert [emb.max_ids_per_step, 4] not in shapes  # pulled_rows left out
    served = tf.saved_model.load(str(tmp_path / "out"))
    np.testing.assert_array_equal(served.serve(tf.constant(x)), model.predict(x, verbose=0))


def _size(path):
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class Trainer(Lookup):
    """Serves and trains: the train function pushes into the table."""

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64)])
    def train(self, ids):
        self.table.push(ids, tf.ones([tf.size(ids), 3]), learning_rate=0.1)
        return self.table.pull(ids, training=True)


def test_a_model_that_pushes_or_pulls_in_training_is_refused_and_nothing_written(tmp_path):
    module = Trainer(_contents([1, 2]))
    tf.saved_model.save(module, str(tmp_path / "model"), signatures={"serving_default": module.__call__})
    with pytest.raises(RewriteError) as e:
        tf_lora.rewrite.densify(tmp_path / "model", tmp_path / "out")
    message = str(e.value)
    assert "TfLora>SparseTablePush on table features" in message
    assert "a training pull (it inserts ids) on table features" in message
    assert "model.export" in message
    assert not os.path.exists(tmp_path / "out")
    other_uses = tf_lora.rewrite.inspect(tmp_path / "model")["sparse_tables"][0]["other_uses"]
    assert len(other_uses) == 2 and all("train" in use for use in other_uses)


class TwoTables(tf.Module):
    def __init__(self):
        super().__init__()
        self.users = tf_lora.SparseTable(2, name="users")
        self.items = tf_lora.SparseTable(4, name="items")
        self.users.import_(_contents([10, 20], dim=2))
        self.items.import_(_contents([1, 2, 3], dim=4))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.int64)])
    def __call__(self, user, item):
        return {"user": self.users.pull(user), "item": self.items.pull(item)}


def test_table_option_densifies_the_chosen_table_only(tmp_path, capsys):
    module = TwoTables()
    src = _save(module, tmp_path / "model")
    args = ["densify", str(src), str(tmp_path / "out"), "--table", "items", "--verify"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "table items (items, dim 4): 3 ids -> densified/items/keys, densified/items/values" in out
    assert "verify serving_default: max |difference| = 0" in out
    assert [t["name"] for t in tf_lora.rewrite.inspect(tmp_path / "out")["sparse_tables"]] == ["users"]
    loaded = tf.saved_model.load(str(tmp_path / "out"))
    got = loaded.signatures["serving_default"](user=[20, 5], item=[3, 9, 1])
    np.testing.assert_array_equal(got["user"], module.users.pull([20, 5]))
    np.testing.assert_array_equal(got["item"], module.items.pull([3, 9, 1]))

    assert cli.main(["densify", str(src), str(tmp_path / "none"), "--table", "user"]) == 2
    err = capsys.readouterr().err
    assert "no table matches 'user' (tables: users (users), items (items))" in err
    assert not os.path.exists(tmp_path / "none")


def test_models_without_tables_and_tf1_graphs_are_refused(tmp_path):
    module = tf.Module()
    module.w = tf.Variable([1.0])
    module.f = tf.function(lambda x: x * module.w, input_signature=[tf.TensorSpec([None], tf.float32)])
    tf.saved_model.save(module, str(tmp_path / "plain"))
    with pytest.raises(RewriteError, match="holds no tf_lora SparseTable"):
        tf_lora.rewrite.densify(tmp_path / "plain", tmp_path / "out")

    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        x = tf.compat.v1.placeholder(tf.float32, [None], name="x")
        y = tf.identity(x * 2.0, name="y")
        tf.compat.v1.saved_model.simple_save(session, str(tmp_path / "tf1"), {"x": x}, {"y": y})
    with pytest.raises(RewriteError, match="is a TF1 graph; densify reads TF2 SavedModels"):
        tf_lora.rewrite.densify(tmp_path / "tf1", tmp_path / "out")
    with pytest.raises(RewriteError, match="min_update_count must be >= 0"):
        tf_lora.rewrite.densify(tmp_path / "plain", tmp_path / "out", min_update_count=-1)
    assert not os.path.exists(tmp_path / "out")


def test_verify_with_tables_sharing_ids_and_min_update_count(tmp_path, capsys):
    # Id 7 is held by both tables: the users table leaves it out (one push), the items table keeps it. The
    # check's inputs must not feed it to either table (the users table now reads it as zeros, on purpose).
    module = TwoTables()
    module.users.import_(_contents([7, 20], dim=2, counts=[1, 5]))
    module.items.import_(_contents([7, 8, 9], dim=4, counts=[5, 5, 5]))
    src = _save(module, tmp_path / "model")
    args = ["densify", str(src), str(tmp_path / "out"), "--min-update-count", "3", "--verify", "--json"]
    assert cli.main(args) == 0, capsys.readouterr()
    result = json.loads(capsys.readouterr().out)
    assert {d["name"]: (d["ids"], d["left_out"]) for d in result["densified"]} == {
        "users": (1, 1),
        "items": (3, 0),
    }
    loaded = tf.saved_model.load(str(tmp_path / "out"))
    got = loaded.signatures["serving_default"](user=[7, 20], item=[7, 1])
    np.testing.assert_array_equal(got["user"][0], [0, 0])
    np.testing.assert_array_equal(got["user"][1], module.users.pull([20])[0])
    np.testing.assert_array_equal(got["item"], module.items.pull([7, 1]))


def test_a_refused_rewrite_leaves_an_existing_out_as_it_was(tmp_path, capsys):
    module = Trainer(_contents([1, 2]))
    tf.saved_model.save(module, str(tmp_path / "model"), signatures={"serving_default": module.__call__})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert cli.main(["densify", str(tmp_path / "model"), str(tmp_path / "out"), "--overwrite"]) == 2
    assert "TfLora>SparseTablePush" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


class UnderLoop(tf.Module):
    def __init__(self):
        super().__init__()
        self.table = tf_lora.SparseTable(2, name="features")

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.int64)])
    def __call__(self, ids):
        return tf.map_fn(lambda row: self.table.pull(row), ids, fn_output_signature=tf.float32)


class UnderCond(tf.Module):
    def __init__(self):
        super().__init__()
        self.table = tf_lora.SparseTable(2, name="features")

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64)])
    def __call__(self, ids):
        return tf.cond(tf.size(ids) > 0, lambda: self.table.pull(ids), lambda: tf.zeros([0, 2]))


def test_a_pull_under_tf_cond_is_densified_and_one_under_a_loop_refused(tmp_path):
    module = UnderCond()
    module.table.import_(_contents([3, 4], dim=2))
    src = _save(module, tmp_path / "model")
    (report,) = tf_lora.rewrite.densify(src, tmp_path / "out").tables
    assert len(report.lookups) == 1 and _plugin_ops(tmp_path / "out") == []
    loaded = tf.saved_model.load(str(tmp_path / "out"))
    for ids in ([3, 9, 4], np.zeros(0, np.int64)):
        np.testing.assert_array_equal(loaded.signatures["serving_default"](ids=ids)["output_0"], module(ids))

    src = _save(UnderLoop(), tmp_path / "loop")
    with pytest.raises(RewriteError, match=r"While \(a pull inside a loop is not densified\)"):
        tf_lora.rewrite.densify(src, tmp_path / "loop_out")
    assert not os.path.exists(tmp_path / "loop_out")


def test_a_keras_model_with_sparse_inputs_saved_from_a_module_densifies(tmp_path):
    # tf.saved_model.save of a module holding a Keras model with a SparseEmbedding failed (the layer's list
    # of step ids was serialized where SavedModel functions cannot reach its variables): the README's way to
    # serve a model with sparse inputs, which model.export refuses.
    keras.utils.set_random_seed(4)
    ids = keras.Input((4,), dtype="int64", sparse=True)
    model = keras.Model(ids, tf_lora.layers.SparseEmbedding(4, combiner="mean", name="emb")(ids))
    model.compile(optimizer="sgd", loss="mse")
    x = tf.sparse.from_dense(np.arange(1, 33, dtype=np.int64).reshape(8, 4) % 11)
    model.fit(x, np.ones((8, 4)), verbose=0)

    class Serve(tf.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        @tf.function(
            input_signature=[
                tf.TensorSpec([None, 2], tf.int64),
                tf.TensorSpec([None], tf.int64),
                tf.TensorSpec([2], tf.int64),
            ]
        )
        def serve(self, indices, values, dense_shape):
            return {"emb": self.model(tf.SparseTensor(indices, values, dense_shape), training=False)}

    module = Serve(model)
    tf.saved_model.save(module, str(tmp_path / "model"), signatures={"serving_default": module.serve})
    (report,) = tf_lora.rewrite.densify(tmp_path / "model", tmp_path / "out").tables
    assert report.name == "emb" and report.ids == 10  # from_dense drops the zeros: ids 1..10
    probe = tf.sparse.from_dense(np.array([[3, 0, 12, 5], [10, 10, 0, 0]], np.int64))
    args = {"indices": probe.indices, "values": probe.values, "dense_shape": probe.dense_shape}
    got = tf.saved_model.load(str(tmp_path / "out")).signatures["serving_default"](**args)["emb"]
    np.testing.assert_allclose(got, model(probe, training=False), rtol=1e-6)


def test_odd_table_names_int32_ids_shards_and_a_saved_model_pb_path(tmp_path, capsys):
    # Names that are no TensorFlow scope name ("user emb", "a:b") failed to load back; --verify fed int32
    # ids as zeros, so an id 0 left out by --min-update-count failed a correct rewrite; a sharded table is
    # chosen by its own name.
    class Module(tf.Module):
        def __init__(self):
            super().__init__()
            self.a = tf_lora.SparseTable(2, name="user emb")
            self.b = tf_lora.SparseTable(2, name="a:b")
            self.c = tf_lora.ShardedSparseTable(2, ["/cpu:0", "/cpu:0"], name="sharded")
            self.a.import_(_contents([0, 1, 2], dim=2, counts=[1, 5, 5]))
            self.b.import_(_contents([3, 4], dim=2, counts=[5, 5]))
            self.c.import_(_contents([5, 6, 7], dim=2, counts=[5, 5, 5]))

        @tf.function(input_signature=[tf.TensorSpec([None], tf.int32)])
        def __call__(self, ids):
            ids = tf.cast(ids, tf.int64)
            return {"a": self.a.pull(ids), "b": self.b.pull(ids), "c": self.c.pull(ids)}

    src = _save(Module(), tmp_path / "model")
    args = ["densify", str(src), str(tmp_path / "out"), "--min-update-count", "2", "--verify", "--json"]
    assert cli.main(args) == 0, capsys.readouterr()
    result = json.loads(capsys.readouterr().out)
    assert sorted((d["name"], d["keys"]) for d in result["densified"]) == [
        ("a:b", "densified/a_b/keys"),
        ("sharded_shard_0", "densified/sharded_shard_0/keys"),
        ("sharded_shard_1", "densified/sharded_shard_1/keys"),
        ("user emb", "densified/user_emb/keys"),
    ]
    assert result["verify"]["max_difference"] == {"serving_default": 0.0}

    assert cli.main(["densify", str(src), str(tmp_path / "c"), "--table", "sharded", "--json"]) == 0
    assert [d["name"] for d in json.loads(capsys.readouterr().out)["densified"]] == [
        "sharded_shard_0",
        "sharded_shard_1",
    ]
    assert cli.main(["densify", str(src / "saved_model.pb"), str(tmp_path / "d")]) == 2
    assert "a SavedModel's own file; pass its directory" in capsys.readouterr().err


class Ragged(tf.Module):
    def __init__(self):
        super().__init__()
        self.table = tf_lora.SparseTable(2, name="features")

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.int64)])
    def __call__(self, values, row_splits):
        ids = tf.RaggedTensor.from_row_splits(values, row_splits)
        return {"sum": tf.reduce_sum(self.table.pull(ids.flat_values))}


def test_verify_on_a_signature_generated_inputs_cannot_feed_says_so(tmp_path, capsys):
    src = _save(Ragged(), tmp_path / "model")
    assert cli.main(["densify", str(src), str(tmp_path / "out"), "--verify"]) == 2
    err = capsys.readouterr().err
    assert "verify: signature 'serving_default' does not run on generated inputs" in err
    assert "do not form a valid RaggedTensor" in err and "nothing written" in err
    assert cli.main(["densify", str(src), str(tmp_path / "out")]) == 0  # the rewrite itself is fine


def test_a_rewrite_failing_while_it_writes_leaves_no_parent_directories(tmp_path, monkeypatch):
    # The Python API made OUT's missing parents and left them when the rewrite failed after that (the
    # command line removed them).
    src = _save(Lookup(_contents([1, 2])), tmp_path / "model")

    def failing(staging):
        raise RewriteError("the rewritten model does not load back (simulated)")

    monkeypatch.setattr(tf_lora.rewrite.densification, "resave", failing)
    with pytest.raises(RewriteError, match="simulated"):
        tf_lora.rewrite.densify(src, tmp_path / "a" / "b" / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


class Mixed(tf.Module):
    """An int32 input into a dense table beside an int64 input into a sparse one."""

    def __init__(self):
        super().__init__()
        self.dense = tf.Variable(np.arange(20, dtype=np.float32).reshape(10, 2))
        self.table = tf_lora.SparseTable(2, name="features")
        self.table.import_(_contents([0, 5, 9], dim=2, counts=[1, 5, 5]))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int32), tf.TensorSpec([None], tf.int64)])
    def __call__(self, dense_ids, ids):
        return {"sum": tf.gather(self.dense, dense_ids) + self.table.pull(ids)}


def test_verify_of_a_model_with_a_dense_int32_input_still_probes_the_table(tmp_path, capsys):
    # Probing the int32 input with the table's ids failed in the dense gather; verify then fed zeros to both
    # inputs, and id 0, left out by --min-update-count, failed a correct rewrite.
    src = _save(Mixed(), tmp_path / "model")
    args = ["densify", str(src), str(tmp_path / "out"), "--min-update-count", "2", "--verify"]
    assert cli.main(args) == 0, capsys.readouterr().err
    assert "verify serving_default: max |difference| = 0" in capsys.readouterr().out
