"""tf_lora.layers.LoraEinsumDense: keras.layers.EinsumDense (the attention projections of Keras's
MultiHeadAttention and of keras-hub's transformers) with LoRA adapters on its frozen kernel."""

import keras
import tensorflow as tf

from tf_lora.layers.kernel_layout import EinsumView, kernel_variable, layer_view
from tf_lora.layers.lora_layer import DEFAULT_ADAPTER, LoraAdapters, keras_lora_names


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
        return layer_view(self)

    def build(self, input_shape):
        super().build(input_shape)
        self.view  # noqa: B018 - an equation without an [in, out] view fails here, when built
        self._lora_build()

    def call(self, inputs, adapter_ids=None, training=None):
        x = self._checked_input(inputs)
        view = self.view
        y = keras.ops.einsum(self.equation, x, kernel_variable(self))
        x_rows, y2, back = view.rows(x, y)
        x2 = tf.reshape(x_rows, [-1, view.in_features])
        y = back(self._lora_rows(x_rows, adapter_ids, training)(y2, x2))
        if self.bias is not None:  # after the adapters (DoRA scales x @ w' without it)
            y = y + tf.cast(self.bias, y.dtype)
        return self.activation(y) if self.activation is not None else y

    def save_own_variables(self, store):
        store["0"] = kernel_variable(self)
        if self.bias is not None:
            store["1"] = self.bias
        self._save_lora_variables(store)

    def load_own_variables(self, store):
        kernel_variable(self).assign(store["0"])
        if self.bias is not None:
            self.bias.assign(store["1"])
        self._load_lora_variables(store)

    def get_config(self):
        config = super().get_config()
        config.update(self._lora_config())
        return config
