"""tf_lora.layers.LoraEinsumDense: keras.layers.EinsumDense (the attention projections of Keras's
MultiHeadAttention and of keras-hub's transformers) with LoRA adapters on its frozen kernel."""

import dataclasses
import math
import re

import keras
import tensorflow as tf

from tf_lora.layers.lora_layer import DEFAULT_ADAPTER, LoraAdapters, keras_lora_names

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

    def kernel_matrix(self, kernel):
        """The kernel `[in, out]`."""
        order = [self.kernel_axes.index(c) for c in self.in_axes + self.out_axes]
        kernel = kernel if order == list(range(len(order))) else tf.transpose(kernel, order)
        return tf.reshape(kernel, [self.in_features, self.out_features])


@keras.saving.register_keras_serializable(package="tf_lora")
class LoraEinsumDense(LoraAdapters, keras.layers.EinsumDense):
    """A drop-in `keras.layers.EinsumDense` (same arguments) with a frozen kernel adapted by LoRA.

    The kernel is seen as a matrix `[in, out]` through the equation (`EinsumView`: `in` is the kernel's axes
    the input contracts, `out` the axes the output keeps, each flattened in kernel order), so `lora_a` is
    `[in, rank]` and `lora_b` `[rank, out]`: the same update a LoRA on the equivalent `Linear(in, out)` makes
    (PEFT's `q_proj` on `query`'s `[hidden, heads, head_dim]` kernel, whatever the kernel's axis order).
    The forward is the layer's einsum, then the fused `lora_apply` (or `batched_lora_apply` with per-example
    adapter ids) on its output rows. Named adapters, `merge()`/`unmerge()`, `adapter_ids` and the arguments
    rank, alpha, use_rslora, lora_dropout, adapters, active_adapter and train_bias are as in `LoraDense`.

    >>> layer = tf_lora.layers.LoraEinsumDense("abc,cde->abde", (None, 2, 4), bias_axes="de", rank=2)
    >>> layer(tf.ones([1, 3, 8])).shape
    TensorShape([1, 3, 2, 4])
    """

    def __init__(
        self,
        equation,
        output_shape,
        rank=None,
        alpha=None,
        use_rslora=False,
        lora_dropout=0.0,
        adapters=(),
        active_adapter=DEFAULT_ADAPTER,
        train_bias=False,
        lora_rank=None,
        lora_alpha=None,
        use_dora=False,
        **kwargs,
    ):
        rank, alpha = keras_lora_names("LoraEinsumDense", rank, alpha, lora_rank, lora_alpha)
        super().__init__(equation, output_shape, **kwargs)
        self._lora_setup(
            rank,
            alpha,
            use_rslora,
            lora_dropout,
            adapters,
            active_adapter,
            train_bias,
            "LoraEinsumDense",
            use_dora,
        )

    @property
    def view(self) -> EinsumView:
        """The kernel seen as `[in, out]`."""
        return EinsumView.parse(self.equation, self._kernel_variable().shape, self._describe())

    def _lora_shape(self):
        view = self.view
        return view.in_features, view.out_features

    def build(self, input_shape):
        super().build(input_shape)
        self.view  # noqa: B018 - an equation without an [in, out] view fails here, when built
        self._lora_build()

    def call(self, inputs, adapter_ids=None, training=None):
        x = self._checked_input(inputs)
        y = keras.ops.einsum(self.equation, x, self._kernel_variable())
        x_rows, y2, back = self.view.rows(x, y)
        x2 = tf.reshape(x_rows, [-1, self.view.in_features])
        y = back(self._lora_rows(x_rows, adapter_ids, training)(y2, x2))
        if self.bias is not None:  # after the adapters (DoRA scales x @ w' without it)
            y = y + tf.cast(self.bias, y.dtype)
        return self.activation(y) if self.activation is not None else y

    def _kernel_matrix(self):
        return self.view.kernel_matrix(tf.convert_to_tensor(self._kernel_variable()))

    def _set_kernel_matrix(self, matrix):
        kernel = self._kernel_variable()
        kernel.assign(tf.cast(self.view.kernel_update(matrix), kernel.dtype))

    def _add_to_kernel(self, update):
        kernel = self._kernel_variable()
        kernel.assign_add(tf.cast(self.view.kernel_update(update), kernel.dtype))

    def save_own_variables(self, store):
        store["0"] = self._kernel_variable()
        if self.bias is not None:
            store["1"] = self.bias
        self._save_lora_variables(store)

    def load_own_variables(self, store):
        self._kernel_variable().assign(store["0"])
        if self.bias is not None:
            self.bias.assign(store["1"])
        self._load_lora_variables(store)

    def get_config(self):
        config = super().get_config()
        config.update(self._lora_config())
        return config
