"""Vectorization (pfor) converters for the LoRA ops.

`tf.vectorized_map`, `GradientTape.jacobian` / `batch_jacobian` and the vectorized per-example gradients
of DP-SGD (TensorFlow Privacy) rewrite a loop body into one batched graph, op by op, through converters
registered with TensorFlow's pfor. Without one an op runs in a while_loop, one iteration at a time, with
a warning. These converters run the fused kernels over all iterations in one call (LoraMerge, one pass over
its weight, as stock batched ops).

pfor hands a converter each input with a leading loop dimension L where it varies across iterations
("stacked"). The row inputs (y, x, grad, adapter ids, the saved x @ a) then flatten into L * N rows.
Where the adapters vary too, or where the outputs are sums over each iteration's rows (the gradients of
a, b and the scales), every iteration's adapter becomes an adapter of its own: the multi-adapter op with
L (or L * A) adapters, each row's id naming its iteration's copy, computes exactly the per-iteration
results, still fused.
"""

import tensorflow as tf
from tensorflow.python.ops.parallel_for import pfor  # private: TensorFlow's converter registry

from tf_lora.python.ops import gen_lora_ops


def _varies(pfor_input, indices):
    return any(pfor_input.input(i).is_stacked for i in indices)


def _stacked(pfor_input, indices):
    """Inputs `indices` with the loop dimension (loop-invariant ones tiled)."""
    pfor_input.stack_inputs(list(indices))
    return [pfor_input.stacked_input(i) for i in indices]


def _flat(t):
    """[L, N, ...] -> [L * N, ...] (sizes explicit: N may be 0)."""
    shape = tf.shape(t)
    return tf.reshape(t, tf.concat([shape[:1] * shape[1:2], shape[2:]], 0))


def _unflat(t, length, rows):
    """[L * N, ...] -> [L, N, ...]."""
    return tf.reshape(t, tf.concat([[length, rows], tf.shape(t)[1:]], 0))


def _iteration_ids(length, rows):
    """[L * N] ids naming each flattened row's iteration."""
    return tf.repeat(tf.range(length, dtype=tf.int32), rows)


def _offset_ids(ids, adapters, op_type):
    """[L, N] adapter ids -> [L * N] ids into the [L * A] adapters of all iterations (-1 stays -1). An id
    past an iteration's adapters would name another iteration's: refused here, as the op refuses it."""
    check = tf.debugging.assert_less(
        ids,
        adapters,
        message=f"{op_type} (vectorized): adapter_ids must be in [-1, number of adapters)",
    )
    with tf.control_dependencies([check]):
        offset = tf.range(tf.shape(ids)[0], dtype=tf.int32)[:, None] * adapters
        return tf.reshape(tf.where(ids >= 0, ids + offset, ids), [-1])


@pfor.RegisterPFor("TfLora>LoraApply")
def _lora_apply(pfor_input):
    y, x = _stacked(pfor_input, (0, 1))
    length, rows = tf.shape(x)[0], tf.shape(x)[1]
    if _varies(pfor_input, (2, 3, 4)):  # an adapter per iteration
        a, b, scale = _stacked(pfor_input, (2, 3, 4))
        out, xa = gen_lora_ops.tf_lora_batched_lora_apply(
            _flat(y), _flat(x), a, b, _iteration_ids(length, rows), scale
        )
    else:
        a, b, scale = (pfor_input.unstacked_input(i) for i in (2, 3, 4))
        out, xa = gen_lora_ops.tf_lora_lora_apply(_flat(y), _flat(x), a, b, scale)
    return [pfor.wrap(_unflat(out, length, rows)), pfor.wrap(_unflat(xa, length, rows))]


@pfor.RegisterPFor("TfLora>LoraApplyGrad")
def _lora_apply_grad(pfor_input):
    # da, db and dscale sum over each iteration's rows: an adapter per iteration.
    g, x, a, b, scale, *saved = _stacked(pfor_input, range(pfor_input.num_inputs))
    length, rows = tf.shape(x)[0], tf.shape(x)[1]
    xa, grad_xa = ([_flat(saved[0])], [_flat(saved[1])]) if saved else ([], [])
    dx, da, db, dscale = gen_lora_ops.tf_lora_batched_lora_apply_grad(
        _flat(g), _flat(x), a, b, _iteration_ids(length, rows), scale, xa, grad_xa
    )
    return [pfor.wrap(_unflat(dx, length, rows)), pfor.wrap(da), pfor.wrap(db), pfor.wrap(dscale)]


@pfor.RegisterPFor("TfLora>BatchedLoraApply")
def _batched_lora_apply(pfor_input):
    y, x, ids = _stacked(pfor_input, (0, 1, 4))
    length, rows = tf.shape(x)[0], tf.shape(x)[1]
    if _varies(pfor_input, (2, 3, 5)):
        a_stack, b_stack, scales = _stacked(pfor_input, (2, 3, 5))
        ids = _offset_ids(ids, tf.shape(a_stack)[1], pfor_input.op_type)
        a_stack, b_stack, scales = (_flat(t) for t in (a_stack, b_stack, scales))  # [L * A, ...]
    else:
        a_stack, b_stack, scales = (pfor_input.unstacked_input(i) for i in (2, 3, 5))
        ids = _flat(ids)
    out, xa = gen_lora_ops.tf_lora_batched_lora_apply(_flat(y), _flat(x), a_stack, b_stack, ids, scales)
    return [pfor.wrap(_unflat(out, length, rows)), pfor.wrap(_unflat(xa, length, rows))]


@pfor.RegisterPFor("TfLora>BatchedLoraApplyGrad")
def _batched_lora_apply_grad(pfor_input):
    g, x, a_stack, b_stack, ids, scales, *saved = _stacked(pfor_input, range(pfor_input.num_inputs))
    length, rows = tf.shape(x)[0], tf.shape(x)[1]
    adapters = tf.shape(a_stack)[1]
    ids = _offset_ids(ids, adapters, pfor_input.op_type)
    xa, grad_xa = ([_flat(saved[0])], [_flat(saved[1])]) if saved else ([], [])
    dx, da, db, dscales = gen_lora_ops.tf_lora_batched_lora_apply_grad(
        _flat(g), _flat(x), _flat(a_stack), _flat(b_stack), ids, _flat(scales), xa, grad_xa
    )
    return [
        pfor.wrap(_unflat(dx, length, rows)),
        *(pfor.wrap(_unflat(t, length, adapters)) for t in (da, db, dscales)),
    ]


@pfor.RegisterPFor("TfLora>LoraMerge")
def _lora_merge(pfor_input):
    # w + scale * a @ b per iteration with stock ops (a merge is one pass over w, nothing to fuse across
    # iterations), accumulating as the kernel does (float32 for the half types); a @ b once when the
    # adapter is the same in every iteration.
    w, scale = _stacked(pfor_input, (0, 3))
    if _varies(pfor_input, (1, 2)):
        a, b = _stacked(pfor_input, (1, 2))
    else:
        a, b = pfor_input.unstacked_input(1), pfor_input.unstacked_input(2)
    dtype = tf.float64 if w.dtype == tf.float64 else tf.float32
    w32, a32, b32, s32 = (tf.cast(t, dtype) for t in (w, a, b, scale))
    return [pfor.wrap(tf.cast(w32 + s32[:, None, None] * tf.matmul(a32, b32), w.dtype))]
