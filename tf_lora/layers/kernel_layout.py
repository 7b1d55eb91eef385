"""How tf_lora sees a layer's weight as the matrix `[in, out]` LoRA adapts, in one place: the weight's
variable (Dense's and EinsumDense's kernel, Embedding's table), an EinsumDense kernel's view through its
equation (EinsumView), reading and writing the weight as that matrix, and merging `scale * a @ b` into it
(DoRA's merge included). The LoRA layers, the in-place conversion, the adapter tools and the graph
rewrites all use these."""

import dataclasses
import math
import re

import keras
import numpy as np
import tensorflow as tf

from tf_lora.python.ops import lora_ops

_EQUATION = re.compile(r"(?P<x>[a-zA-Z.]*),(?P<k>[a-zA-Z]+)->(?P<y>[a-zA-Z.]*)")


@dataclasses.dataclass(frozen=True)
class EinsumView:
    """An EinsumDense kernel seen as a matrix `[in, out]`: `in` is the kernel's axes the input contracts
    (in kernel order), `out` its axes that reach the output; the other axes of the input and output are the
    rows. Through this view the layer is `y = x @ kernel` row by row, which is where LoRA's `x @ a @ b` goes.

    Attributes:
      equation: The layer's equation.
      in_axes, out_axes: The kernel's input and output axis labels, in kernel order.
      in_shape, out_shape: Their sizes.

    >>> view = tf_lora.layers.EinsumView.parse("btd,ndh->btnh", (4, 16, 8))  # Gemma's query kernel
    >>> view.in_axes, view.out_axes, view.in_features, view.out_features
    ('d', 'nh', 16, 32)
    """

    equation: str
    kernel_axes: str
    in_axes: str
    out_axes: str
    in_shape: tuple
    out_shape: tuple

    @classmethod
    def parse(cls, equation, kernel_shape, who="EinsumDense"):
        """The view of `equation` with a kernel of `kernel_shape`; ValueError when there is none (a kernel
        axis both in the input and the output, or an input axis summed away)."""
        match = _EQUATION.fullmatch(equation.replace(" ", ""))
        if match is None:
            raise ValueError(f"{who}: equation {equation!r} is not of the form 'xyz,kernel->out'")
        x, k, y = match["x"], match["k"], match["y"]
        if x.startswith("...") != y.startswith("...") or "." in x.lstrip(".") or "." in y.lstrip("."):
            raise ValueError(
                f"{who}: equation {equation!r}: LoRA takes '...' only at the start of both input and output"
            )
        x, y = x.removeprefix("..."), y.removeprefix("...")
        in_axes = "".join(c for c in k if c in x and c not in y)
        out_axes = "".join(c for c in k if c in y and c not in x)
        shared = [c for c in k if c in x and c in y]
        problems = []
        if shared:
            problems.append(f"kernel axes {shared} are in both the input and the output")
        if not in_axes or not out_axes:
            problems.append("the kernel needs axes the input contracts and axes the output keeps")
        if {c for c in x if c not in k} != {c for c in y if c not in k}:
            problems.append("input axes are summed away or output axes come from nowhere")
        if len(set(k)) != len(k) or len(kernel_shape) != len(k):
            problems.append(f"the kernel {tuple(kernel_shape)} does not fit {k!r}")
        if problems:
            raise ValueError(
                f"{who}: equation {equation!r} has no [in, out] view for LoRA: " + "; ".join(problems)
            )
        size = dict(zip(k, kernel_shape, strict=True))
        return cls(
            equation,
            k,
            in_axes,
            out_axes,
            tuple(int(size[c]) for c in in_axes),
            tuple(int(size[c]) for c in out_axes),
        )

    @property
    def in_features(self) -> int:
        return math.prod(self.in_shape)

    @property
    def out_features(self) -> int:
        return math.prod(self.out_shape)

    def _specs(self, x_rank, y_rank):
        """The input's and output's axis labels, '...' spelled out for these ranks."""
        match = _EQUATION.fullmatch(self.equation.replace(" ", ""))
        x, y = match["x"], match["y"]
        if x.startswith("..."):
            x, y = x[3:], y[3:]
            ellipsis = "".join(chr(0x3B1 + i) for i in range(x_rank - len(x)))  # labels no equation uses
            x, y = ellipsis + x, ellipsis + y
        return x, y

    def rows(self, x, y):
        """(x_rows [rows..., in], y2 [N, out], back) for an input x and the layer's output y: x_rows keeps
        the row axes (what per-example adapter ids broadcast over), `back(y2)` is y2 in y's layout. Reshapes
        only, no copies, when x ends with the input axes and y with the output axes in kernel order (every
        keras-hub and Keras attention projection)."""
        x_spec, y_spec = self._specs(x.shape.rank, y.shape.rank)
        batch = [c for c in x_spec if c not in self.kernel_axes]
        x_order = [x_spec.index(c) for c in batch + list(self.in_axes)]
        rows_layout = batch + list(self.out_axes)  # the layout of y2 reshaped
        y_order = [y_spec.index(c) for c in rows_layout]  # y -> rows layout
        xt = x if x_order == sorted(x_order) else tf.transpose(x, x_order)
        yt = y if y_order == sorted(y_order) else tf.transpose(y, y_order)
        x_rows = tf.reshape(xt, tf.concat([tf.shape(xt)[: len(batch)], [self.in_features]], 0))
        y2 = tf.reshape(yt, [-1, self.out_features])
        rows_shape = tf.shape(yt)
        back_order = [rows_layout.index(c) for c in y_spec]

        def back(new_y2):
            out = tf.reshape(new_y2, rows_shape)
            if back_order != sorted(back_order):
                out = tf.transpose(out, back_order)
            out.set_shape(y.shape)
            return out

        return x_rows, y2, back

    def kernel_update(self, update):
        """An update `[in, out]` in the kernel's own layout."""
        labels = self.in_axes + self.out_axes
        update = tf.reshape(update, self.in_shape + self.out_shape)
        order = [labels.index(c) for c in self.kernel_axes]
        return update if order == list(range(len(order))) else tf.transpose(update, order)

    def to_kernel_layout(self, matrix):
        """A numpy matrix `[in, out]` in the kernel's own layout (kernel_update's numpy twin)."""
        labels = self.in_axes + self.out_axes
        matrix = np.reshape(matrix, self.in_shape + self.out_shape)
        return np.transpose(matrix, [labels.index(c) for c in self.kernel_axes])

    def kernel_matrix(self, kernel):
        """The kernel `[in, out]`."""
        order = [self.kernel_axes.index(c) for c in self.in_axes + self.out_axes]
        kernel = kernel if order == list(range(len(order))) else tf.transpose(kernel, order)
        return tf.reshape(kernel, [self.in_features, self.out_features])


def kernel_variable(layer):
    """The variable holding a Dense or EinsumDense layer's weight, or an Embedding's table (Keras's `kernel`
    and `embeddings` may be properties adding Keras's own LoRA to it)."""
    if isinstance(layer, keras.layers.Embedding):
        return layer._embeddings  # noqa: SLF001
    kernel = getattr(layer, "_kernel", None)
    return layer.kernel if kernel is None else kernel


def layer_view(layer):
    """An EinsumDense layer's EinsumView (parsed once per equation and kernel shape), or None for a layer
    whose weight is a matrix already."""
    if not isinstance(layer, keras.layers.EinsumDense):
        return None
    key = (layer.equation, tuple(kernel_variable(layer).shape))
    cached = layer.__dict__.get("_tf_lora_view")
    if cached is None or cached[0] != key:
        cached = (key, EinsumView.parse(key[0], key[1], layer.name))
        object.__setattr__(layer, "_tf_lora_view", cached)  # a cache, not state Keras tracks
    return cached[1]


def lora_shape(layer):
    """(in, out): a layer's weight seen as the matrix LoRA adapts."""
    view = layer_view(layer)
    if view is not None:
        return view.in_features, view.out_features
    kernel = kernel_variable(layer)
    return int(kernel.shape[0]), int(kernel.shape[1])


def kernel_matrix(layer):
    """A layer's weight as the matrix `[in, out]` (a tensor)."""
    kernel, view = tf.convert_to_tensor(kernel_variable(layer)), layer_view(layer)
    return kernel if view is None else view.kernel_matrix(kernel)


def layer_parts(layer):
    """A Dense, EinsumDense or Embedding layer's weight as `[in, out]` (a table as it is) and its bias
    `[out]` when it has one, as numpy."""
    parts = {"weight": kernel_matrix(layer).numpy()}
    if getattr(layer, "bias", None) is not None:
        parts["bias"] = np.reshape(layer.bias.numpy(), [-1])
    return parts


def set_kernel_matrix(layer, matrix):
    """Assigns a matrix `[in, out]` to a layer's weight, in the weight's own layout."""
    kernel, view = kernel_variable(layer), layer_view(layer)
    matrix = tf.convert_to_tensor(matrix)
    kernel.assign(tf.cast(matrix if view is None else view.kernel_update(matrix), kernel.dtype))


def adapted_norm(layer, a, b, scale):
    """The column norms [out] of the weight with an adapter, `||w + scale * a @ b||`, in float32 (float64 for
    a float64 weight), with stock ops (a constant expression of variables, which the graph tools' fold
    evaluates and XLA compiles)."""
    kernel = kernel_matrix(layer)
    dtype = tf.float64 if kernel.dtype == tf.float64 else tf.float32
    a, b, scale = (tf.cast(tf.convert_to_tensor(v), dtype) for v in (a, b, scale))
    return tf.norm(tf.cast(kernel, dtype) + scale * tf.matmul(a, b), axis=0)


def merge_into_layer(layer, a, b, scale, magnitude=None):
    """`weight += scale * a @ b` in place on a layer's weight seen as [in, out]; with a DoRA `magnitude`
    [out], PEFT's DoRA merge: `weight <- magnitude / ||w'|| * w'`, `w' = weight + scale * a @ b`, the norms
    taken over each output column. Returns those norms (DoRA) or None."""
    kernel, view = kernel_variable(layer), layer_view(layer)
    if magnitude is not None:
        norm = adapted_norm(layer, a, b, scale)
        dtype = norm.dtype
        update = tf.cast(scale, dtype) * tf.matmul(tf.cast(a, dtype), tf.cast(b, dtype))
        adapted = tf.cast(kernel_matrix(layer), dtype) + update
        set_kernel_matrix(layer, adapted * (tf.cast(magnitude, dtype) / norm))
        return norm
    if view is None:
        lora_ops.merge_into_variable(kernel, tf.cast(a, kernel.dtype), tf.cast(b, kernel.dtype), scale)
    else:
        update = tf.matmul(tf.cast(a, kernel.dtype), tf.cast(b, kernel.dtype)) * tf.cast(scale, kernel.dtype)
        kernel.assign_add(view.kernel_update(update))
    return None
