"""LoRA ops: public wrappers and registered gradients."""

import tensorflow as tf

from tf_lora.python.ops import gen_lora_ops

_HALF_TYPES = (tf.float16, tf.bfloat16)


def lora_merge(w, a, b, scale, name=None) -> tf.Tensor:
    """Merges a LoRA adapter into a weight matrix: `w + scale * (a @ b)`.

    One pass over `w` on all CPU worker threads, with no `[in, out]` temporary besides the result (which
    reuses `w`'s buffer when TensorFlow can forward it). float16 and bfloat16 accumulate in float32.
    Differentiable with respect to every input.

    Args:
      w: The base weight, `[in, out]`, float32, float64, float16 or bfloat16.
      a: The adapter's down projection, `[in, r]`, same dtype as `w`.
      b: The adapter's up projection, `[r, out]`, same dtype as `w`.
      scale: Scalar multiplier of the update (usually `alpha / r`), a Python number or a scalar tensor of
        `w`'s dtype.
      name: Optional name of the op.

    Returns:
      `w + scale * (a @ b)`, `[in, out]`, `w`'s dtype.

    Raises:
      ValueError: when shapes known at graph construction do not fit (in graph mode).
      tf.errors.InvalidArgumentError: when shapes do not fit at run time.
      TypeError: (graph mode) when `a`, `b` or `scale` do not have `w`'s dtype, or the dtype is not
        supported.
      tf.errors.InvalidArgumentError: (eager) the same dtype errors.

    >>> w = tf.zeros([2, 3])
    >>> a = tf.constant([[1.0], [2.0]])
    >>> b = tf.constant([[1.0, 0.0, -1.0]])
    >>> tf_lora.lora_merge(w, a, b, 0.5).numpy()
    array([[ 0.5,  0. , -0.5],
           [ 1. ,  0. , -1. ]], dtype=float32)
    """
    return gen_lora_ops.tf_lora_lora_merge(w, a, b, scale, name=name)


@tf.RegisterGradient("TfLora>LoraMerge")
def _lora_merge_grad(op, grad):
    """dw = g; da = scale * g @ b^T; db = scale * a^T @ g; dscale = sum(g * (a @ b)).

    dscale is computed as sum((a^T @ g) * b), which is the same sum without an [in, out] temporary.
    """
    _, a, b, scale = op.inputs
    a_t_grad = tf.matmul(a, grad, transpose_a=True)  # [r, out]
    da = scale * tf.matmul(grad, b, transpose_b=True)
    db = scale * a_t_grad
    if grad.dtype in _HALF_TYPES:
        dscale = tf.reduce_sum(tf.cast(a_t_grad, tf.float32) * tf.cast(b, tf.float32))
        dscale = tf.cast(dscale, grad.dtype)
    else:
        dscale = tf.reduce_sum(a_t_grad * b)
    return [grad, da, db, dscale]
