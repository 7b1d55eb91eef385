"""Keras's own LoRA (`Dense.enable_lora`, `EinsumDense.enable_lora`, keras-hub's `.lora.h5` files) in
tf_lora's layout, and back, exactly.

Keras keeps `lora_kernel_a` with the kernel's shape but its last axis replaced by the rank, and
`lora_kernel_b` `[rank, last axis]`: the update `alpha / rank * a @ b` is a matmul over the kernel's last axis
alone. tf_lora sees the kernel as `[in, out]` through the layer's equation (EinsumView). Where the kernel's
last axis is its only output axis (Dense, attention output projections) the two are the same factors.
Where other output axes come before it (the heads of a query/key/value kernel `[hidden, heads, head_dim]`),
Keras's update is one rank-r update per head sharing `b`: as a matrix `[in, out]` it is exactly a rank
`heads * r` update, `a` gathering the heads' factors side by side and `b` repeating Keras's `b` on the
diagonal; going back, an update of any rank is exactly Keras's with rank = the last axis (`b` the identity).
"""

import math

import numpy as np


def _labels(view):
    """The kernel's axis labels, a label for the rank no equation uses, and the output axes before the
    kernel's last axis."""
    rank_label = next(c for c in "RSTUVWXYZrstuvwxyz" if c not in view.kernel_axes)
    last = view.kernel_axes[-1]
    if last not in view.out_axes:
        raise ValueError(
            f"equation {view.equation!r}: the kernel's last axis is not an output axis; Keras's LoRA layout "
            "does not apply"
        )
    middle = "".join(c for c in view.out_axes if c != last)
    return rank_label, last, middle


def from_keras_factors(view, a_keras, b_keras):
    """Keras's factors (`a` kernel.shape[:-1] + (r,), `b` [r, last]) -> tf_lora's `(a [in, R], b [R, out])`
    with the same `a @ b` on the [in, out] view (R = r times the sizes of the output axes before the last).
    `view` None: a Dense kernel, the factors as they are."""
    a_keras, b_keras = np.asarray(a_keras), np.asarray(b_keras)
    if view is None:
        return a_keras, b_keras
    rank_label, last, middle = _labels(view)
    r = a_keras.shape[-1]
    sizes = dict(zip(view.out_axes, view.out_shape, strict=True))
    heads, width = math.prod(sizes[c] for c in middle), sizes[last]
    a = np.einsum(f"{view.kernel_axes[:-1]}{rank_label}->{view.in_axes}{middle}{rank_label}", a_keras)
    a = a.reshape(view.in_features, heads * r)
    b = np.einsum("mn,rl->mrnl", np.eye(heads, dtype=b_keras.dtype), b_keras).reshape(
        heads * r, heads * width
    )
    return np.ascontiguousarray(a), b


def _per_head_factors(view, rank_label, middle, a, b):
    """Keras's `(a, b)` at rank r when `b` is block-diagonal over the heads with equal blocks (what
    `from_keras_factors` makes of a Keras adapter), else None."""
    sizes = dict(zip(view.out_axes, view.out_shape, strict=True))
    heads = math.prod(sizes[c] for c in middle)
    width = view.out_features // heads
    if a.shape[1] % heads:
        return None
    r = a.shape[1] // heads
    blocks = b.reshape(heads, r, heads, width)
    diagonal = np.stack([blocks[m, :, m, :] for m in range(heads)])
    off = blocks.copy()
    for m in range(heads):
        off[m, :, m, :] = 0
    if np.any(off) or not np.all(diagonal == diagonal[0]):
        return None
    in_sizes = dict(zip(view.in_axes, view.in_shape, strict=True))
    shape = [in_sizes[c] for c in view.in_axes] + [sizes[c] for c in middle] + [r]
    a_keras = np.einsum(
        f"{view.in_axes}{middle}{rank_label}->{view.kernel_axes[:-1]}{rank_label}", a.reshape(shape)
    )
    return np.ascontiguousarray(a_keras), diagonal[0]


def to_keras_factors(view, kernel_shape, a, b, scale):
    """tf_lora's `scale * a @ b` -> Keras's `(a, b)` at scale 1 (Keras's alpha = its rank): the same rank
    where the kernel's last axis is its only output axis, else rank = the last axis (Keras's `b` the
    identity)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32) * np.float32(scale)
    if view is None:
        return a, b
    rank_label, _, middle = _labels(view)
    if not middle:  # the input axes are the kernel's axes before the last, in kernel order
        return a.reshape(tuple(kernel_shape[:-1]) + (a.shape[1],)), b
    per_head = _per_head_factors(view, rank_label, middle, a, b)
    if per_head is not None:  # an adapter that came from Keras's layout goes back at its own rank
        return per_head
    width = int(kernel_shape[-1])
    return view.to_kernel_layout(a @ b), np.eye(width, dtype=np.float32)
