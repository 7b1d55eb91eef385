"""Main example: merge a LoRA adapter into a weight matrix with tf_lora and check it against numpy.

A dense layer y = x @ W carries a rank-r adapter (A [in, r], B [r, out], scale alpha / r). Merging folds the
adapter into the weight, W' = W + scale * A @ B, so the layer needs no extra ops at serving time. The example
checks W' against numpy, then checks that x @ W' gives what the unmerged layer gives.

    make demo            (or: .venv/bin/python examples/merge_adapter.py, with the wheel installed)
"""

import sys

import numpy as np
import tensorflow as tf

import tf_lora


def main():
    rng = np.random.default_rng(0)
    in_dim, out_dim, rank, alpha = 1024, 768, 16, 32.0
    scale = alpha / rank
    w = (rng.standard_normal((in_dim, out_dim)) / np.sqrt(in_dim)).astype(np.float32)
    a = (rng.standard_normal((in_dim, rank)) / np.sqrt(in_dim)).astype(np.float32)
    b = (rng.standard_normal((rank, out_dim)) * 0.1).astype(np.float32)
    x = rng.standard_normal((32, in_dim)).astype(np.float32)

    merged = tf_lora.lora_merge(w, a, b, scale).numpy()
    assert merged.dtype == np.float32, merged.dtype
    reference = w.astype(np.float64) + scale * (a.astype(np.float64) @ b.astype(np.float64))
    merge_err = float(np.max(np.abs(merged - reference)))

    unmerged_out = x @ w + scale * (x @ a) @ b  # the adapter applied beside the frozen weight
    merged_out = tf.matmul(x, merged).numpy()
    output_err = float(np.max(np.abs(merged_out - unmerged_out)))

    print(f"tf_lora {tf_lora.__version__} (TensorFlow {tf.__version__}) from {tf_lora.__file__}")
    print(f"merged a rank-{rank} adapter (scale {scale}) into W [{in_dim}, {out_dim}]")
    print(f"  max |W' - numpy reference|          = {merge_err:.3g}")
    print(f"  max |x @ W' - (x @ W + s x A B)|    = {output_err:.3g}")
    ok = merge_err < 1e-5 and output_err < 1e-3
    print("PASS: merged weights match numpy" if ok else "FAIL: merged weights differ from numpy")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
