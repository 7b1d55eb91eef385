"""LoRA ops: public wrappers and registered gradients."""

import tensorflow as tf

from tf_lora.python.ops import gen_lora_ops, lora_pfor  # noqa: F401 - lora_pfor registers converters
from tf_lora.python.ops.xla import in_xla_context

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
    if in_xla_context():
        return _composed_merge(w, a, b, scale, name)
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
    return [grad, da, db, _sum_of_products(a_t_grad, b)]


def lora_apply(y, x, a, b, scale, name=None) -> tf.Tensor:
    """Adds a LoRA adapter's output to a layer's output: `y + scale * (x @ a) @ b`.

    Fused: `x @ a` (`[N, r]`, float32 for half types) then a single pass that reads and writes `y`, with no
    `[N, out]` temporary; `y`'s buffer is reused when TensorFlow can forward it (as when `y` comes straight
    from a MatMul, see `lora_matmul`). Differentiable with respect to every input.

    Args:
      y: The base layer's output, `[N, out]`, float32, float64, float16 or bfloat16.
      x: The layer's input, `[N, in]`, same dtype.
      a: The adapter's down projection, `[in, r]`, same dtype.
      b: The adapter's up projection, `[r, out]`, same dtype.
      scale: Scalar multiplier of the update (usually `alpha / r`), a Python number or a scalar tensor.
      name: Optional name of the op.

    Returns:
      `y + scale * (x @ a) @ b`, `[N, out]`.

    Raises:
      ValueError: (graph construction) shapes that cannot fit.
      tf.errors.InvalidArgumentError: shapes that do not fit at run time, and (eager) dtype errors.
      TypeError: (graph mode) inputs whose dtypes differ, or an unsupported dtype.

    >>> x = tf.constant([[1.0, 2.0]])
    >>> y = tf.zeros([1, 3])
    >>> a = tf.constant([[1.0], [1.0]])
    >>> b = tf.constant([[1.0, 0.0, -1.0]])
    >>> tf_lora.lora_apply(y, x, a, b, 2.0).numpy()
    array([[ 6.,  0., -6.]], dtype=float32)
    """
    if in_xla_context():
        return _composed_apply(y, x, a, b, scale, name)
    return gen_lora_ops.tf_lora_lora_apply(y, x, a, b, scale, name=name).y_out


def lora_matmul(x, w, a, b, scale, bias=None, name=None) -> tf.Tensor:
    """A LoRA layer: `x @ w (+ bias) + scale * (x @ a) @ b`.

    TensorFlow's own MatMul (oneDNN on CPU) computes `x @ w`, then `lora_apply` adds the adapter in place
    on its output, so the adapter costs one extra pass over the output instead of extra ops and `[N, out]`
    temporaries. `x` may have leading batch dimensions.

    Args:
      x: The input, `[..., in]`.
      w: The frozen base weight, `[in, out]`, `x`'s dtype.
      a: The adapter's down projection, `[in, r]`.
      b: The adapter's up projection, `[r, out]`.
      scale: Scalar multiplier of the update (usually `alpha / r`).
      bias: Optional bias, `[out]`, added before the adapter.
      name: Optional name scope.

    Returns:
      `[..., out]`, `x`'s dtype.

    >>> x = tf.ones([2, 5, 8])
    >>> w, a, b = tf.ones([8, 4]), tf.ones([8, 2]), tf.zeros([2, 4])
    >>> tf_lora.lora_matmul(x, w, a, b, 1.0).shape
    TensorShape([2, 5, 4])
    """
    with tf.name_scope(name or "lora_matmul"):
        return matmul_then(
            tf.convert_to_tensor(x, name="x"), w, bias, lambda y, x2: lora_apply(y, x2, a, b, scale)
        )


def int32_ids(adapter_ids):
    """adapter_ids as int32; int64 ids outside int32 stay out of the adapters' range, never wrap."""
    ids = tf.convert_to_tensor(adapter_ids, dtype_hint=tf.int32, name="adapter_ids")
    if ids.dtype == tf.int64:
        ids = tf.cast(tf.clip_by_value(ids, -2, 2**31 - 1), tf.int32)
    return ids


def matmul_then(x, w, bias, apply):
    """`apply(x2 @ w (+ bias), x2)` on x flattened to [N, in], reshaped back to [..., out]."""
    w = tf.convert_to_tensor(w, dtype_hint=x.dtype, name="w")
    x2 = x if x.shape.rank == 2 else tf.reshape(x, [-1, tf.shape(x)[-1]])
    y = tf.matmul(x2, w)
    if bias is not None:
        y = tf.nn.bias_add(y, tf.convert_to_tensor(bias, dtype_hint=x.dtype, name="bias"))
    y = apply(y, x2)
    if x.shape.rank == 2:
        return y
    out = tf.reshape(y, tf.concat([tf.shape(x)[:-1], tf.shape(y)[-1:]], axis=0))
    out.set_shape(x.shape[:-1].concatenate(y.shape[-1:]))
    return out


@tf.RegisterGradient("TfLora>LoraApply")
def _lora_apply_grad(op, grad, grad_xa):
    """dy = grad; dx, da, db, dscale from the fused TfLora>LoraApplyGrad kernel (one pass, [N, r] scratch),
    handed LoraApply's second output x @ a (so that it need not compute it again) and the gradient for it.
    That gradient is zeros (TensorFlow's tapes fill in an output nothing differentiates) except under
    second derivatives, where LoraApplyGrad's own gradient reaches x @ a."""
    _, x, a, b, scale = op.inputs
    xa = op.outputs[1]
    if grad_xa is None:  # tf.gradients leaves it out
        grad_xa = tf.zeros_like(xa)
    dx, da, db, dscale = gen_lora_ops.tf_lora_lora_apply_grad(grad, x, a, b, scale, [xa], [grad_xa])
    return [grad, dx, da, db, dscale]


@tf.RegisterGradient("TfLora>BatchedLoraApply")
def _batched_lora_apply_grad(op, grad, grad_xa):
    """dy = grad; the rest from the fused TfLora>BatchedLoraApplyGrad kernel, per adapter, handed the
    forward's per-row x @ a and the gradient for it (as LoraApply's gradient); ids: none."""
    _, x, a_stack, b_stack, ids, scales = op.inputs
    xa = op.outputs[1]
    if grad_xa is None:
        grad_xa = tf.zeros_like(xa)
    dx, da, db, dscales = gen_lora_ops.tf_lora_batched_lora_apply_grad(
        grad, x, a_stack, b_stack, ids, scales, [xa], [grad_xa]
    )
    return [grad, dx, da, db, None, dscales]


@tf.RegisterGradient("TfLora>BatchedLoraApplyGrad")
def _batched_lora_apply_grad_grad(op, *grads):
    """Second derivatives of BatchedLoraApply, by differentiating its gradients written per row with
    gathers and segment sums (rows with id -1 contribute nothing). Memory-hungry ([N, in, r] per-row
    adapters), but only second-order uses (Hessian-vector products, gradient penalties) come here."""
    g, x, a_stack, b_stack, ids, scales, *saved = op.inputs
    adapters = tf.shape(a_stack)[0]
    with tf.GradientTape() as tape:
        tape.watch([g, x, a_stack, b_stack, scales, *saved])
        valid = tf.cast(ids >= 0, x.dtype)
        k = tf.maximum(ids, 0)
        a, b = tf.gather(a_stack, k), tf.gather(b_stack, k)
        s = tf.gather(scales, k) * valid
        g_bt = tf.einsum("no,nro->nr", g, b)
        if saved:  # BatchedLoraApply's x @ a (an input here) and the gradient for it
            xa, grad_xa = saved
            u = s[:, None] * g_bt + valid[:, None] * grad_xa
        else:
            xa, u = tf.einsum("ni,nir->nr", x, a), s[:, None] * g_bt
        outputs = [
            tf.einsum("nr,nir->ni", u, a),
            tf.math.unsorted_segment_sum(tf.einsum("ni,nr->nir", x, u), k, adapters),
            tf.math.unsorted_segment_sum(s[:, None, None] * tf.einsum("nr,no->nro", xa, g), k, adapters),
            tf.math.unsorted_segment_sum(valid * tf.reduce_sum(xa * g_bt, axis=1), k, adapters),
        ]
    dg, dx, da, db, dscales, *dsaved = tape.gradient(
        outputs, [g, x, a_stack, b_stack, scales, *saved], output_gradients=list(grads)
    )
    return [dg, dx, da, db, None, dscales, *dsaved]


@tf.RegisterGradient("TfLora>LoraApplyGrad")
def _lora_apply_grad_grad(op, *grads):
    """Second derivatives, for Hessian-vector products and gradient penalties: LoraApplyGrad is linear in
    grad, in x and in each of a, b, scale (and in xa and grad_xa when given: saved = 1), so this
    differentiates the same products written with tf.matmul. A given xa is LoraApply's x @ a, an input
    of its own here: its gradient goes back to LoraApply's second output, whose gradient passes it on to
    x and a."""
    g, x, a, b, scale, *saved = op.inputs
    with tf.GradientTape() as tape:
        tape.watch([g, x, a, b, scale, *saved])
        g_bt = tf.matmul(g, b, transpose_b=True)
        if saved:
            xa, grad_xa = saved
            u = scale * g_bt + grad_xa
        else:
            xa, u = tf.matmul(x, a), scale * g_bt
        outputs = [
            tf.matmul(u, a, transpose_b=True),
            tf.matmul(x, u, transpose_a=True),
            scale * tf.matmul(xa, g, transpose_a=True),
            tf.reduce_sum(xa * g_bt),
        ]
    return tape.gradient(outputs, [g, x, a, b, scale, *saved], output_gradients=list(grads))


def _sum_of_products(p, q):
    """sum(p * q), accumulated in float32 for half types."""
    if p.dtype in _HALF_TYPES:
        return tf.cast(tf.reduce_sum(tf.cast(p, tf.float32) * tf.cast(q, tf.float32)), p.dtype)
    return tf.reduce_sum(p * q)


def batched_lora_apply(y, x, a_stack, b_stack, adapter_ids, scales, name=None) -> tf.Tensor:
    """Adds a per-row choice of LoRA adapters to a layer's output, for multi-adapter serving.

    Row `i` becomes `y[i] + scales[k] * (x[i] @ a_stack[k]) @ b_stack[k]` with `k = adapter_ids[i]`;
    `k = -1` leaves the row as it is. Rows may come in any order: the kernel groups them by adapter and
    runs the fused single-adapter kernel over each group in place, with no `[N, out]` temporary and no
    per-row copy of the adapters (which `tf.gather(a_stack, ids)` + einsum would make). Differentiable in
    `y`, `x`, `a_stack`, `b_stack` and `scales`.

    Args:
      y: The base layer's output, `[N, out]`.
      x: The layer's input, `[N, in]`, `y`'s dtype.
      a_stack: The adapters' down projections, `[n, in, r]`.
      b_stack: The adapters' up projections, `[n, r, out]`.
      adapter_ids: Each row's adapter, int32 or int64 `[N]`, in `[-1, n)`.
      scales: Each adapter's scale, `[n]`.
      name: Optional name of the op.

    Returns:
      `[N, out]`, `y`'s dtype.

    Raises:
      tf.errors.InvalidArgumentError: an id outside `[-1, n)` (naming the first such row), adapter counts
        that differ between `a_stack`, `b_stack` and `scales`, or shapes that do not fit.

    >>> y, x = tf.zeros([3, 2]), tf.ones([3, 2])
    >>> a_stack, b_stack = tf.ones([2, 2, 1]), tf.ones([2, 1, 2])
    >>> tf_lora.batched_lora_apply(y, x, a_stack, b_stack, [1, -1, 0], [1.0, 0.5]).numpy()
    array([[1., 1.],
           [0., 0.],
           [2., 2.]], dtype=float32)
    """
    if in_xla_context():
        return _composed_batched_apply(y, x, a_stack, b_stack, int32_ids(adapter_ids), scales, name)
    return gen_lora_ops.tf_lora_batched_lora_apply(
        y, x, a_stack, b_stack, int32_ids(adapter_ids), scales, name=name
    ).y_out


def batched_lora_matmul(x, w, a_stack, b_stack, adapter_ids, scales, bias=None, name=None) -> tf.Tensor:
    """A LoRA layer serving several adapters at once: `x @ w (+ bias)` plus each row's own adapter.

    TensorFlow's own MatMul computes `x @ w`, then `batched_lora_apply` adds adapter `adapter_ids[...]` to
    each row in place. `x` may have leading batch dimensions `[..., in]`; `adapter_ids` then has shape
    `[...]`, one id per row (-1: base model only).

    Args:
      x: The input, `[..., in]`.
      w: The frozen base weight, `[in, out]`.
      a_stack: The adapters' down projections, `[n, in, r]`.
      b_stack: The adapters' up projections, `[n, r, out]`.
      adapter_ids: int32 `[...]`, each row's adapter in `[-1, n)`.
      scales: `[n]`.
      bias: Optional bias, `[out]`, added before the adapters.
      name: Optional name scope.

    Returns:
      `[..., out]`.

    >>> x = tf.ones([2, 3, 4])
    >>> out = tf_lora.batched_lora_matmul(
    ...     x, tf.ones([4, 5]), tf.ones([2, 4, 1]), tf.zeros([2, 1, 5]), [[0, 1, -1], [1, 1, 0]], [1.0, 1.0])
    >>> out.shape
    TensorShape([2, 3, 5])
    """
    with tf.name_scope(name or "batched_lora_matmul"):
        x = tf.convert_to_tensor(x, name="x")
        ids = tf.reshape(int32_ids(adapter_ids), [-1])
        return matmul_then(x, w, bias, lambda y, x2: batched_lora_apply(y, x2, a_stack, b_stack, ids, scales))


def merge_into_variable(var, a, b, scale, name=None):
    """Merges a LoRA adapter into a variable in place: `var += scale * a @ b`.

    The update writes the variable's own buffer in one pass (no `[in, out]` tensor is allocated), which is
    how a server hot-swaps adapters on a base weight it keeps. If a value read from the variable is still
    alive and shares its buffer, that value is left untouched: the result goes to a new buffer in the same
    single pass, as TensorFlow's own `ResourceApply*` ops do. On any error the variable is unchanged.

    Args:
      var: A resource variable (`tf.Variable`, or a `keras.Variable` on the TensorFlow backend) holding the
        base weight, `[in, out]`.
      a: The adapter's down projection, `[in, r]`, `var`'s dtype.
      b: The adapter's up projection, `[r, out]`, `var`'s dtype.
      scale: Scalar multiplier of the update (usually `alpha / r`).
      name: Optional name of the op.

    Returns:
      None; the update op when building a TF1-style graph (outside `tf.function`), to run in a session.

    Raises:
      TypeError: `var` is not a resource variable.
      tf.errors.InvalidArgumentError: shapes or dtypes that do not fit (the variable is unchanged).

    >>> w = tf.Variable(tf.zeros([2, 3]))
    >>> tf_lora.merge_into_variable(w, tf.ones([2, 1]), tf.ones([1, 3]), 0.5)
    >>> w.numpy()
    array([[0.5, 0.5, 0.5],
           [0.5, 0.5, 0.5]], dtype=float32)
    """
    handle = _variable_handle(var)
    if in_xla_context():
        variable = var if isinstance(var, tf.Variable) else var.value
        with tf.name_scope(name or "merge_into_variable"):
            variable.assign(_composed_merge(variable, a, b, scale, None))
        return None
    op = gen_lora_ops.tf_lora_resource_lora_merge(handle, a, b, scale, name=name)
    return None if tf.inside_function() else op


def unmerge_from_variable(var, a, b, scale, name=None):
    """Removes a merged LoRA adapter from a variable in place: `var -= scale * a @ b`.

    The inverse of `merge_into_variable(var, a, b, scale)`: merging then unmerging restores the weight to
    within floating-point rounding. Same arguments, errors and guarantees.

    >>> w = tf.Variable(tf.ones([2, 2]))
    >>> a, b = tf.ones([2, 1]), tf.ones([1, 2])
    >>> tf_lora.merge_into_variable(w, a, b, 0.5)
    >>> tf_lora.unmerge_from_variable(w, a, b, 0.5)
    >>> w.numpy()
    array([[1., 1.],
           [1., 1.]], dtype=float32)
    """
    _variable_handle(var)  # a clear TypeError before var.dtype is read
    with tf.name_scope(name or "unmerge_from_variable"):
        return merge_into_variable(var, a, b, -tf.convert_to_tensor(scale, dtype=var.dtype))


def _variable_handle(var):
    """The resource handle of a tf.Variable, or of the tf.Variable behind a Keras 3 variable."""
    if not isinstance(var, tf.Variable) and isinstance(getattr(var, "value", None), tf.Variable):
        var = var.value  # keras.Variable on the TensorFlow backend
    handle = getattr(var, "handle", None)
    if not isinstance(var, tf.Variable) or handle is None or handle.dtype != tf.resource:
        raise TypeError(
            f"expected a resource variable (tf.Variable or keras.Variable), got {type(var).__name__}"
        )
    return handle


tf.no_gradient("TfLora>ResourceLoraMerge")


# -- under XLA (tf_lora.python.ops.xla): the same math as stock ops, which XLA compiles and fuses ---------
# Half types accumulate in float32 and round once, as the kernels do. Gradients are TensorFlow's own.


def _accumulator(dtype):
    return tf.float32 if dtype in _HALF_TYPES else dtype


def _composed_merge(w, a, b, scale, name):
    with tf.name_scope(name or "lora_merge_xla"):
        w = tf.convert_to_tensor(w)
        acc = _accumulator(w.dtype)
        delta = tf.matmul(tf.cast(a, acc), tf.cast(b, acc)) * tf.cast(scale, acc)
        return tf.cast(tf.cast(w, acc) + delta, w.dtype)


def _composed_apply(y, x, a, b, scale, name):
    with tf.name_scope(name or "lora_apply_xla"):
        y = tf.convert_to_tensor(y)
        acc = _accumulator(y.dtype)
        xa = tf.matmul(tf.cast(x, acc), tf.cast(a, acc))
        delta = tf.matmul(xa * tf.cast(scale, acc), tf.cast(b, acc))
        return tf.cast(tf.cast(y, acc) + delta, y.dtype)


def _composed_batched_apply(y, x, a_stack, b_stack, ids, scales, name):
    """x against every adapter at once (`[N, n * r]`, two GEMMs), each row masked to its own adapter
    scaled: no per-row copy of the adapters. XLA cannot raise on data, so a row whose id is outside
    [-1, n) comes out NaN instead of the op's InvalidArgument: never a plausible wrong value."""
    with tf.name_scope(name or "batched_lora_apply_xla"):
        y = tf.convert_to_tensor(y)
        acc = _accumulator(y.dtype)
        a_stack, b_stack = tf.cast(a_stack, acc), tf.cast(b_stack, acc)
        n, d_in, r = tf.shape(a_stack)[0], tf.shape(a_stack)[1], tf.shape(a_stack)[2]
        d_out = tf.shape(b_stack)[2]
        a_all = tf.reshape(tf.transpose(a_stack, [1, 0, 2]), [d_in, n * r])
        xa = tf.reshape(tf.matmul(tf.cast(x, acc), a_all), [-1, n, r])
        mask = tf.one_hot(ids, n, dtype=acc) * tf.cast(scales, acc)[tf.newaxis, :]
        xa = tf.reshape(xa * mask[:, :, tf.newaxis], [-1, n * r])
        out = tf.cast(y, acc) + tf.matmul(xa, tf.reshape(b_stack, [n * r, d_out]))
        bad = (ids < -1) | (ids >= n)
        out = tf.where(bad[:, tf.newaxis], tf.constant(float("nan"), acc), out)
        return tf.cast(out, y.dtype)
