"""What the rewrites refuse: patterns whose rewrite would change outputs, outputs that would clobber inputs,
models that only look equal. Each case once produced wrong output or lost data (found in review)."""

import os

import numpy as np
import pytest
import tensorflow as tf

import tf_lora
from tf_lora.rewrite import RewriteError

R = np.random.default_rng(0)


def f32(*shape):
    return R.standard_normal(shape).astype(np.float32)


def _save(module, path, signatures=None):
    tf.saved_model.save(module, str(path), signatures=signatures or module.__call__)
    return path


class TiedEmbedding(tf.Module):
    """E is the LoRA MatMul's weight and also gathered as an embedding: folding would change the lookup."""

    def __init__(self):
        super().__init__()
        self.e, self.a, self.b = (
            tf.Variable(f32(5, 3), name="e"),
            tf.Variable(f32(5, 2)),
            tf.Variable(f32(2, 3)),
        )

    @tf.function(input_signature=[tf.TensorSpec([None, 5], tf.float32), tf.TensorSpec([None], tf.int32)])
    def __call__(self, x, ids):
        return {"y": tf_lora.lora_matmul(x, self.e, self.a, self.b, 1.0), "emb": tf.gather(self.e, ids)}


class WeightInCond(tf.Module):
    """w is also read inside a cond branch, a function fold does not follow."""

    def __init__(self):
        super().__init__()
        self.w, self.a, self.b = (
            tf.Variable(f32(4, 3), name="w"),
            tf.Variable(f32(4, 2)),
            tf.Variable(f32(2, 3)),
        )

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32), tf.TensorSpec([], tf.bool)])
    def __call__(self, x, base_only):
        y = tf_lora.lora_matmul(x, self.w, self.a, self.b, 1.0)
        return {"y": y, "z": tf.cond(base_only, lambda: tf.matmul(x, self.w), lambda: tf.zeros_like(y))}


class BaseAndTuned(tf.Module):
    """One weight, two signatures: one serves no adapter (ids -1), the other adapter 0."""

    def __init__(self):
        super().__init__()
        self.w = tf.Variable(f32(4, 3), name="w")
        self.a, self.b = tf.Variable(f32(1, 4, 2)), tf.Variable(f32(1, 2, 3))

    def _f(self, x, k):
        ids = tf.fill([tf.shape(x)[0]], k)
        return {"y": tf_lora.batched_lora_matmul(x, self.w, self.a, self.b, ids, [1.0])}

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
    def base(self, x):
        return self._f(x, -1)

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
    def tuned(self, x):
        return self._f(x, 0)


class OtherOutput(tf.Module):
    """The apply's x is another output (r) of the node whose q the MatMul multiplies."""

    def __init__(self):
        super().__init__()
        self.w, self.a, self.b = tf.Variable(f32(4, 3)), tf.Variable(f32(4, 2)), tf.Variable(f32(2, 3))

    @tf.function(input_signature=[tf.TensorSpec([4, 4], tf.float32)])
    def __call__(self, z):
        q, r = tf.linalg.qr(z)
        return {"y": tf_lora.lora_apply(tf.matmul(q, self.w), r, self.a, self.b, 1.0)}


@pytest.mark.parametrize(
    ("module", "signatures", "message"),
    [
        (
            TiedEmbedding,
            None,
            r"weight 'e' is used by .*Gather \(ResourceGather\), which fold cannot rewrite",
        ),
        (WeightInCond, None, r"weight 'w' is used by .*cond \(If\), which fold cannot rewrite"),
        (BaseAndTuned, ("base", "tuned"), r"weight 'w': its MatMuls carry different adapters"),
        (OtherOutput, None, r"its input 'Qr:r:0' is not its MatMul's input 'Qr:q:0'"),
    ],
)
def test_fold_refuses_what_it_would_get_wrong(tmp_path, module, signatures, message):
    m = module()
    sigs = {s: getattr(m, s) for s in signatures} if signatures else None
    src = _save(m, tmp_path / "model", sigs)
    with pytest.raises(RewriteError, match=message):
        tf_lora.rewrite.fold(src, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["model"]


class WithCopy(tf.Module):
    """An unbound copy of the weight with the same (default) name and value: not the weight's to change."""

    def __init__(self):
        super().__init__()
        self.w, self.a, self.b = tf.Variable(f32(4, 3)), tf.Variable(f32(4, 2)), tf.Variable(f32(2, 3))
        self.w_init = tf.Variable(self.w.numpy())

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
    def __call__(self, x):
        return {"y": tf_lora.lora_matmul(x, self.w, self.a, self.b, 1.0)}


def test_fold_leaves_same_named_copies_alone(tmp_path):
    m = WithCopy()
    tf_lora.rewrite.fold(_save(m, tmp_path / "model"), tmp_path / "out")
    loaded = tf.saved_model.load(str(tmp_path / "out"))
    np.testing.assert_array_equal(loaded.w_init.numpy(), m.w_init.numpy())
    np.testing.assert_allclose(loaded.w.numpy(), m.w.numpy() + m.a.numpy() @ m.b.numpy(), rtol=1e-6)


def test_outputs_that_would_clobber_the_input_are_refused(tmp_path):
    src = _save(WithCopy(), tmp_path / "models" / "in")
    (tmp_path / "models" / "keep.txt").write_text("mine")
    for out in (tmp_path / "models", tmp_path / "models" / "in", tmp_path / "models" / "in" / "sub"):
        with pytest.raises(RewriteError, match="must not be the input, contain it, or lie inside it"):
            tf_lora.rewrite.fold(src, out, overwrite=True)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(RewriteError, match="exists and is not a directory"):
        tf_lora.rewrite.fold(src, tmp_path / "a_file", overwrite=True)
    plain = _save(TwoUnnamed(), tmp_path / "models" / "plain")
    with pytest.raises(RewriteError, match="exists and is not a directory"):
        tf_lora.rewrite.inject(
            plain, tmp_path / "a_file", target="Variable", rank=1, alpha=1.0, overwrite=True
        )
    assert sorted(os.listdir(tmp_path / "models")) == ["in", "keep.txt", "plain"]
    assert sorted(os.listdir(tmp_path)) == ["a_file", "models"]  # no staging left behind


class Scaled(tf.Module):
    def __init__(self, w):
        super().__init__()
        self.w = tf.Variable(w)

    @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32)])
    def __call__(self, x):
        return {"y": x * self.w}


def test_verify_catches_nan(tmp_path):
    good = _save(Scaled(1.0), tmp_path / "good")
    bad = _save(Scaled(float("nan")), tmp_path / "bad")
    with pytest.raises(RewriteError, match="output 'y' differs by inf"):
        tf_lora.rewrite.verify(good, bad)


class TwoUnnamed(tf.Module):
    """Two weights that both keep TensorFlow's default name 'Variable'."""

    def __init__(self):
        super().__init__()
        self.w1, self.w2 = tf.Variable(f32(4, 3)), tf.Variable(f32(3, 2))

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
    def __call__(self, x):
        return {"y": tf.matmul(tf.matmul(x, self.w1), self.w2)}


def test_inject_same_named_weights_get_their_own_adapters(tmp_path):
    src = _save(TwoUnnamed(), tmp_path / "model")
    report = tf_lora.rewrite.inject(src, tmp_path / "out", target="Variable", rank=2, alpha=2.0)
    assert [i.shape for i in report] == [(4, 3), (3, 2)]
    assert tf_lora.rewrite.verify(src, tmp_path / "out") == {"serving_default": 0.0}
    loaded = tf.saved_model.load(str(tmp_path / "out"))
    assert loaded.tf_lora_Variable_lora_a.shape == (4, 2) and loaded.tf_lora_Variable_lora_a_2.shape == (3, 2)
