"""tf_lora.rewrite.replace_embedding and `tf-lora replace-embedding`: gathers become sparse-table pulls."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_lora
from tf_lora.rewrite import RewriteError, cli


class Recommender(tf.Module):
    """Two lookups of user_emb (embedding_lookup and tf.gather), one of item_emb, a dense head."""

    def __init__(self, dtype=np.float32):
        super().__init__()
        rng = np.random.default_rng(0)
        self.users = tf.Variable(rng.standard_normal((10, 4)).astype(dtype), name="user_emb")
        self.items = tf.Variable(rng.standard_normal((7, 4)).astype(dtype), name="item_emb")
        self.w = tf.Variable(rng.standard_normal((4, 2)).astype(dtype), name="w")

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int32), tf.TensorSpec([None], tf.int64)])
    def __call__(self, user, item):
        u = tf.nn.embedding_lookup(self.users, user)
        return {
            "score": tf.matmul(u * tf.gather(self.items, item), self.w),
            "user": tf.gather(self.users, user),
        }

    def numpy(self, user, item):
        u, i = self.users.numpy()[user], self.items.numpy()[item]
        return {"score": (u * i) @ self.w.numpy(), "user": u}


def _saved(tmp_path, **kw):
    module = Recommender(**kw)
    tf.saved_model.save(module, str(tmp_path / "model"), signatures=module.__call__)
    return module, tmp_path / "model"


def test_replace_user_embedding_matches_numpy_and_survives_a_resave(tmp_path):
    module, src = _saved(tmp_path)
    report = tf_lora.rewrite.replace_embedding(src, tmp_path / "out", target="user_emb")
    assert [(r.variable, r.shape, len(r.lookups)) for r in report] == [("user_emb", (10, 4), 2)]
    info = tf_lora.rewrite.inspect(tmp_path / "out")
    pulls = [op for op in info["tf_lora_ops"] if op["op"] == "TfLora>SparseTablePull"]
    assert len(pulls) == 2
    assert [lookup["variable"] for lookup in info["embedding_lookups"]] == ["item_emb"]  # untouched

    user, item = np.array([3, 0, 9, 3], np.int32), np.array([6, 1, 0, 2], np.int64)
    loaded = tf.saved_model.load(str(tmp_path / "out"))
    out = loaded.signatures["serving_default"](user=user, item=item)
    expected = module.numpy(user, item)
    np.testing.assert_array_equal(
        out["user"].numpy(), expected["user"]
    )  # the table's rows are the variable's
    np.testing.assert_allclose(out["score"].numpy(), expected["score"], rtol=1e-6, atol=1e-6)
    assert tf_lora.rewrite.verify(src, tmp_path / "out") == {"serving_default": 0.0}
    # Ids past the variable's rows read as zero rows from the table (the gather would have failed).
    np.testing.assert_array_equal(loaded.signatures["serving_default"](user=[12], item=[0])["user"], 0)

    tf.saved_model.save(loaded, str(tmp_path / "again"))  # the table saves and restores through TF itself
    again = tf.saved_model.load(str(tmp_path / "again"))
    np.testing.assert_array_equal(
        again.signatures["serving_default"](user=user, item=item)["user"], expected["user"]
    )


def test_keras_embedding_through_the_cli(tmp_path, capsys):
    keras.utils.set_random_seed(0)
    inp = keras.Input((3,), dtype="int32")
    emb = keras.layers.Embedding(20, 4, name="item")(inp)
    model = keras.Model(inp, keras.layers.Dense(2)(keras.layers.Flatten()(emb)))
    model.export(tmp_path / "model", verbose=False)
    args = ["replace-embedding", str(tmp_path / "model"), str(tmp_path / "out")]
    assert cli.main([*args, "--target", "item", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "item/embeddings [20, 4]: sparse table tf_lora_table_item_embeddings" in out
    assert "verify serve: max |difference| = 0" in out
    ids = np.array([[1, 19, 0], [5, 5, 7]], np.int32)
    served = tf.saved_model.load(str(tmp_path / "out"))
    np.testing.assert_allclose(served.serve(ids), model.predict(ids, verbose=0), rtol=1e-6, atol=1e-6)

    assert cli.main([*args, "--target", "nothing", "--overwrite"]) == 2
    assert (
        "no embedding lookup matches 'nothing' (lookups on: ['item/embeddings'])" in capsys.readouterr().err
    )


def test_bad_variables_write_nothing(tmp_path):
    _, src = _saved(tmp_path, dtype=np.float16)
    with pytest.raises(RewriteError, match=r"user_emb: a float16 \[10, 4\] variable; tables hold float32"):
        tf_lora.rewrite.replace_embedding(src, tmp_path / "out", target="user_emb")
    assert not os.path.exists(tmp_path / "out")
