"""tf_lora.layers.LoraDense: keras.layers.Dense with LoRA adapters on a frozen kernel."""

import keras
import tensorflow as tf

from tf_lora.layers.lora_layer import DEFAULT_ADAPTER, LoraAdapters, keras_lora_names
from tf_lora.python.ops import lora_ops


@keras.saving.register_keras_serializable(package="tf_lora")
class LoraDense(LoraAdapters, keras.layers.Dense):
    """A drop-in `keras.layers.Dense` (same arguments) whose kernel is frozen and adapted by LoRA:
    `activation(x @ kernel + bias + scale * dropout(x) @ lora_a @ lora_b)`.

    `lora_a` `[in, rank]` starts He-uniform and `lora_b` `[rank, units]` at zero, so the layer starts as the
    Dense it replaces. The forward runs through `tf_lora.lora_matmul` (TensorFlow's MatMul, then the fused
    LoRA apply on its output). `merge()` folds the active adapter into the kernel in place and `unmerge()`
    takes it out again (for serving, or switching adapters without reallocating the kernel).

    Named adapters, as in PEFT: the constructor's adapter is called `"default"`; `add_adapter(name, ...)`
    adds more (each with its own rank and alpha), `set_active_adapter(name)` picks the one applied (and the
    only one trained), and `layer(x, adapter_ids=ids)` gives each example its own adapter, served in one
    pass by `tf_lora.batched_lora_matmul` (`ids[i]` indexes `adapter_names`, -1 means the base layer only).
    The active adapter and the scales live in variables, so a switch among the adapters a traced function
    knows reaches it. Adding or deleting an adapter changes the layer's variables: a function traced before
    then fails with an error saying so (never applies a stale adapter) until traced again
    (`model.compile(...)` resets Keras's fit/evaluate/predict functions).

    Args:
      units, activation, use_bias, ...: As `keras.layers.Dense`.
      rank: LoRA rank r of the default adapter (default 8). Keras's own name `lora_rank` is accepted too.
      alpha: LoRA alpha; the scale is alpha / r, or alpha / sqrt(r) with `use_rslora`. Default 16, or the
        rank when Keras's names are used; `lora_alpha` is accepted too.
      use_rslora: rsLoRA scaling.
      lora_dropout: Dropout rate on the LoRA path's input while training.
      adapters: Specs (`name`, `rank`, `alpha`, `use_rslora`) of the adapters beside the default one; what
        `add_adapter` records, so that `get_config` rebuilds them.
      active_adapter: The adapter active once built (None: none).
      train_bias: Train the bias beside the adapters. Default False: the bias is frozen with the kernel, as
        PEFT's `bias="none"`; the trainable set is the same after a `.keras` round trip.

    >>> layer = tf_lora.layers.LoraDense(3, rank=2, alpha=4)
    >>> layer(tf.ones([1, 5])).shape
    TensorShape([1, 3])
    >>> layer.add_adapter("sql", rank=4, alpha=8)
    >>> layer(tf.ones([2, 5]), adapter_ids=[0, 1]).shape
    TensorShape([2, 3])
    """

    def __init__(
        self,
        units,
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
        rank, alpha = keras_lora_names("LoraDense", rank, alpha, lora_rank, lora_alpha)
        super().__init__(units, **kwargs)
        self._lora_setup(
            rank, alpha, use_rslora, lora_dropout, adapters, active_adapter, train_bias, "LoraDense", use_dora
        )

    def build(self, input_shape):
        super().build(input_shape)
        self._lora_build()

    def call(self, inputs, adapter_ids=None, training=None):
        x = self._checked_input(inputs)
        bias = self.bias if self.use_bias else None
        # TensorFlow's MatMul, then the adapters fused onto its output rows (lora_matmul's composition);
        # the bias after them (DoRA scales x @ w' without it).
        y = lora_ops.matmul_then(x, self.kernel, None, self._lora_rows(x, adapter_ids, training))
        if bias is not None:
            y = tf.nn.bias_add(y, tf.cast(bias, y.dtype))
        return self.activation(y) if self.activation is not None else y

    def save_own_variables(self, store):
        super().save_own_variables(store)
        self._save_lora_variables(store)

    def load_own_variables(self, store):
        self.kernel.assign(store["0"])
        if self.use_bias:
            self.bias.assign(store["1"])
        self._load_lora_variables(store)

    def get_config(self):
        config = super().get_config()
        config.update(self._lora_config())
        return config
