"""tf_lora.layers.LoraDense: keras.layers.Dense with a LoRA adapter on a frozen kernel."""

import math

import keras
import tensorflow as tf

from tf_lora.python.ops import lora_ops


@keras.saving.register_keras_serializable(package="tf_lora")
class LoraDense(keras.layers.Dense):
    """A drop-in `keras.layers.Dense` (same arguments) whose kernel is frozen and adapted by LoRA:
    `activation(x @ kernel + bias + scale * dropout(x) @ lora_a @ lora_b)`.

    `lora_a` `[in, rank]` starts He-uniform and `lora_b` `[rank, units]` at zero, so the layer starts as the
    Dense it replaces. The forward runs through `tf_lora.lora_matmul` (TensorFlow's MatMul, then the fused
    LoRA apply on its output). `merge()` folds the adapter into the kernel in place and `unmerge()` takes it
    out again (for serving, or switching adapters without reallocating the kernel).

    Args:
      units, activation, use_bias, ...: As `keras.layers.Dense`.
      rank: LoRA rank r.
      alpha: LoRA alpha; the scale is alpha / r, or alpha / sqrt(r) with `use_rslora`.
      use_rslora: rsLoRA scaling.
      lora_dropout: Dropout rate on the LoRA path's input while training.

    >>> layer = tf_lora.layers.LoraDense(3, rank=2, alpha=4)
    >>> layer(tf.ones([1, 5])).shape
    TensorShape([1, 3])
    """

    def __init__(self, units, rank=8, alpha=16.0, use_rslora=False, lora_dropout=0.0, **kwargs):
        super().__init__(units, **kwargs)
        if int(rank) < 1:
            raise ValueError(f"LoraDense: rank must be >= 1, got {rank}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"LoraDense: lora_dropout must be in [0, 1), got {lora_dropout}")
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.use_rslora = bool(use_rslora)
        self.lora_dropout = float(lora_dropout)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def build(self, input_shape):
        super().build(input_shape)
        self.kernel.trainable = False
        self.lora_a = self.add_weight(
            name="lora_a", shape=(input_shape[-1], self.rank), initializer=keras.initializers.HeUniform()
        )
        self.lora_b = self.add_weight(name="lora_b", shape=(self.rank, self.units), initializer="zeros")
        # 1 while the adapter is applied beside the kernel, 0 once merged into it: a variable, not a Python
        # flag, so that functions Keras traced before a merge see it too.
        self.lora_active = self.add_weight(name="lora_active", shape=(), initializer="ones", trainable=False)
        # The scale too, so that an adapter attached later (tf_lora.adapters.apply) with another alpha
        # reaches functions already traced.
        self.lora_scale = self.add_weight(
            name="lora_scale", shape=(), initializer=keras.initializers.Constant(self.scale), trainable=False
        )

    @property
    def merged(self) -> bool:
        return float(self.lora_active.numpy()) == 0.0

    def call(self, inputs, training=None):
        x = tf.convert_to_tensor(inputs)
        scale = tf.convert_to_tensor(self.lora_scale) * tf.convert_to_tensor(self.lora_active)
        if training and self.lora_dropout > 0:
            x2 = tf.reshape(x, [-1, tf.shape(x)[-1]])
            y = tf.matmul(x2, self.kernel)
            if self.use_bias:
                y = tf.nn.bias_add(y, self.bias)
            dropped = tf.nn.dropout(x2, rate=self.lora_dropout)
            y = lora_ops.lora_apply(y, dropped, self.lora_a, self.lora_b, scale)
            y = tf.reshape(y, tf.concat([tf.shape(x)[:-1], [self.units]], 0))
        else:
            y = lora_ops.lora_matmul(
                x, self.kernel, self.lora_a, self.lora_b, scale, bias=self.bias if self.use_bias else None
            )
        return self.activation(y) if self.activation is not None else y

    def merge(self):
        """Folds the adapter into the kernel in place (kernel += scale * lora_a @ lora_b)."""
        if not self.merged:
            lora_ops.merge_into_variable(self.kernel, self.lora_a, self.lora_b, self.lora_scale)
            self.lora_active.assign(0.0)

    def unmerge(self):
        """Takes a merged adapter out of the kernel again (within rounding)."""
        if self.merged:
            lora_ops.unmerge_from_variable(self.kernel, self.lora_a, self.lora_b, self.lora_scale)
            self.lora_active.assign(1.0)

    # Dense saves kernel and bias only (as "0" and "1"); the adapter's variables go by name beside them.
    _LORA_VARIABLES = ("lora_a", "lora_b", "lora_active", "lora_scale")

    def save_own_variables(self, store):
        super().save_own_variables(store)
        for name in self._LORA_VARIABLES:
            store[name] = getattr(self, name)

    def load_own_variables(self, store):
        self.kernel.assign(store["0"])
        if self.use_bias:
            self.bias.assign(store["1"])
        for name in self._LORA_VARIABLES:
            getattr(self, name).assign(store[name])

    def set_adapter(self, a, b, alpha, use_rslora=False):
        """Loads adapter weights a [in, rank] and b [rank, units] (this layer's rank) with their alpha."""
        if self.merged:
            raise ValueError(f"LoraDense {self.name}: unmerge() before setting another adapter")
        self.lora_a.assign(a)
        self.lora_b.assign(b)
        self.alpha, self.use_rslora = float(alpha), bool(use_rslora)
        self.lora_scale.assign(self.scale)

    def get_config(self):
        config = super().get_config()
        config.update(
            rank=self.rank, alpha=self.alpha, use_rslora=self.use_rslora, lora_dropout=self.lora_dropout
        )
        return config
