"""fold on keras-hub transformers trained with tf_lora: every adapter of GPT-2, Llama and Gemma (attention
projections, Gemma's EinsumDense feed-forward, MLPs) folds, whether the export leaves the sequence length
open (Einsum ops) or fixes it (reshapes and BatchMatMulV2), and stock TensorFlow then serves what the Keras
model computes."""

import numpy as np
import pytest
import tensorflow as tf
from keras_hub_models import VOCAB, tiny_backbone

import tf_lora
from tf_lora.rewrite.model_files import ModelFiles

pytest.importorskip("keras_hub")


@pytest.mark.parametrize(("kind", "length"), [("gpt2", 8), ("llama", 8), ("gemma", 8), ("gemma", None)])
def test_fold_a_keras_hub_backbone_with_lora(tmp_path, kind, length):
    backbone, adapted = tf_lora.inject_lora(tiny_backbone(kind), rank=2, alpha=4, copy=False)
    rng = np.random.default_rng(0)
    for variable in backbone.trainable_variables:
        if variable.path.endswith("lora_b"):
            variable.assign(rng.standard_normal(variable.shape).astype(np.float32) * 0.5)
    spec = {name: tf.TensorSpec([None, length], tf.int32) for name in ("token_ids", "padding_mask")}
    backbone.export(tmp_path / "lora", verbose=False, input_signature=[spec])
    x = {
        "token_ids": rng.integers(0, VOCAB, (2, 8)).astype(np.int32),
        "padding_mask": np.ones((2, 8), np.int32),
    }
    expected = np.asarray(backbone(x))
    base = np.asarray(tiny_backbone(kind)(x))  # the same weights without the adapters
    assert np.abs(expected - base).max() > 0.05 * np.abs(expected).max()

    report = tf_lora.rewrite.fold(tmp_path / "lora", tmp_path / "folded")
    assert sum(f.folded for f in report.folds) == len(adapted)
    assert not [
        op
        for op in ModelFiles(tmp_path / "folded").meta.meta_info_def.stripped_op_list.op
        if "TfLora" in op.name
    ]
    loaded = tf.saved_model.load(str(tmp_path / "folded"))
    served = loaded.serve(x).numpy()
    np.testing.assert_allclose(served, expected, atol=2e-5 * np.abs(expected).max())
