"""tf_lora.layers.LoraEmbedding: keras.layers.Embedding with LoRA adapters on its frozen table, as PEFT
defines LoRA for embeddings."""

import warnings

import keras
import tensorflow as tf

from tf_lora.layers.lora_layer import (
    DEFAULT_ADAPTER,
    LoraAdapters,
    broadcast_ids,
    keras_lora_names,
    resolve_adapter_ids,
)
from tf_lora.python.ops import lora_ops


@keras.saving.register_keras_serializable(package="tf_lora")
class LoraEmbedding(LoraAdapters, keras.layers.Embedding):
    """A drop-in `keras.layers.Embedding` (same arguments) whose table `[vocab, dim]` is frozen and adapted by
    LoRA as PEFT does for embeddings: row `t` becomes `table[t] + scale * a[t] @ b`, `a` `[vocab, rank]`
    (PEFT's `lora_embedding_A` transposed) and `b` `[rank, dim]` (`lora_embedding_B` transposed), so the
    update of the table seen as `[in, out] = [vocab, dim]` is `scale * a @ b`, as for every LoRA layer.

    Named adapters, per-example `adapter_ids` (one id per example covers all its tokens), `merge()` /
    `unmerge()` and the arguments rank, alpha, use_rslora, adapters, active_adapter are as in `LoraDense`
    (`lora_dropout` does not apply to a lookup), and `use_dora` (PEFT's DoRA embedding: the rows of the
    adapted table times magnitude / its column norms). As in PEFT, `b` starts at zero and `a` random.
    keras-hub's ReversibleEmbedding (a language model's tied input/output table) keeps its reverse call: the
    output projection uses the base table until the adapter is merged, as PEFT's tied `lm_head` does.

    >>> layer = tf_lora.layers.LoraEmbedding(100, 8, rank=4)
    >>> layer(tf.constant([[1, 2, 3]])).shape
    TensorShape([1, 3, 8])
    """

    def __init__(
        self,
        input_dim,
        output_dim,
        rank=None,
        alpha=None,
        use_rslora=False,
        adapters=(),
        active_adapter=DEFAULT_ADAPTER,
        lora_rank=None,
        lora_alpha=None,
        use_dora=False,
        **kwargs,
    ):
        rank, alpha = keras_lora_names("LoraEmbedding", rank, alpha, lora_rank, lora_alpha)
        super().__init__(input_dim, output_dim, **kwargs)
        self._lora_setup(
            rank, alpha, use_rslora, 0.0, adapters, active_adapter, False, "LoraEmbedding", use_dora
        )

    def build(self, input_shape=None):
        super().build(input_shape)
        self._lora_build()

    def call(self, inputs, adapter_ids=None, training=None, **kwargs):
        y = super().call(inputs, **kwargs)
        if kwargs.get("reverse"):  # a tied output projection: the base table, as PEFT's tied lm_head
            return y
        with tf.control_dependencies([self._same_adapters_check()]):
            tokens = tf.identity(tf.cast(inputs, tf.int32))
        adapter_ids = resolve_adapter_ids(adapter_ids, self._describe(), self.adapter_names)
        self._check_dora_alone(adapter_ids)
        rows = tf.reshape(tokens, [-1])
        factor = None
        if adapter_ids is None and len(self._slots) == 1:
            slot = self._slots[DEFAULT_ADAPTER]
            on = tf.cast(tf.convert_to_tensor(self.lora_active_adapter) >= 0, slot.scale_var.dtype)
            live = tf.convert_to_tensor(self.lora_active) * on  # 0 once merged, or with no adapter active
            scale = tf.convert_to_tensor(slot.scale_var) * live
            delta = (
                tf.matmul(tf.gather(tf.convert_to_tensor(slot.a), rows), tf.convert_to_tensor(slot.b)) * scale
            )
            if slot.use_dora:  # PEFT's DoRA embedding: (table[t] + scale * a[t] @ b) * its column factor
                factor = self._dora_factor(slot, live)
        else:
            delta = self._batched_delta(tokens, rows, adapter_ids)
        delta = tf.reshape(tf.cast(delta, y.dtype), tf.shape(y))
        return y + delta if factor is None else (y + delta) * tf.cast(factor, y.dtype)

    def merge(self):
        """As `LoraAdapters.merge`. A tied table (keras-hub's ReversibleEmbedding with `tie_weights`) is
        also the model's output projection: the merge changes that too, where the unmerged adapter left it
        at the base table (PEFT's tied `lm_head` behaves the same), so this warns."""
        if not self.merged and self.active_adapter is not None:
            warn_if_tied(self, self._describe(), stacklevel=2)
        super().merge()

    def _batched_delta(self, tokens, rows, adapter_ids):
        """Each row's own adapter (ids index adapter_names, -1: none), with stock gathers."""
        if adapter_ids is None:
            ids = tf.fill(tf.shape(rows), tf.convert_to_tensor(self.lora_active_adapter))
            scales = self._stacked_scales() * tf.convert_to_tensor(self.lora_active)
        else:
            ids = lora_ops.int32_ids(adapter_ids)
            if ids.shape.rank is not None and ids.shape.rank < tokens.shape.rank:
                ids = broadcast_ids(ids, tf.shape(tokens), self._describe())
            ids = tf.reshape(tf.broadcast_to(ids, tf.shape(tokens)), [-1])
            in_range = tf.debugging.assert_less(
                ids, len(self._slots), message=f"{self._describe()}: adapter ids must be < {len(self._slots)}"
            )
            with tf.control_dependencies([self._not_merged_check(), in_range]):
                scales = tf.identity(self._stacked_scales())
        a_stack, b_stack = self._stacked_adapters()
        chosen = tf.maximum(ids, 0)
        xa = tf.gather_nd(a_stack, tf.stack([chosen, rows], axis=-1))  # [N, R]
        delta = tf.einsum("nr,nrd->nd", xa, tf.gather(b_stack, chosen))
        weight = tf.gather(scales, chosen) * tf.cast(ids >= 0, scales.dtype)
        return delta * weight[:, None]

    def save_own_variables(self, store):
        store["0"] = self._embeddings
        if getattr(self, "reverse_embeddings", None) is not None:
            store["1"] = self.reverse_embeddings
        self._save_lora_variables(store)

    def load_own_variables(self, store):
        self._embeddings.assign(store["0"])
        if getattr(self, "reverse_embeddings", None) is not None:
            self.reverse_embeddings.assign(store["1"])
        self._load_lora_variables(store)

    def get_config(self):
        config = super().get_config()
        config.update(self._lora_config())
        for key in ("lora_dropout", "train_bias"):
            config.pop(key)
        return config


def warn_if_tied(layer, where, stacklevel=2):
    """Warns that a merge into `layer`, a tied input/output table (keras-hub's ReversibleEmbedding with
    `tie_weights`), also changes its output projection, which an unmerged adapter leaves at the base
    table."""
    if getattr(layer, "tie_weights", False):
        warnings.warn(
            f"{where}: merging into a tied embedding table also changes the output projection that "
            "shares it (the reverse call), which used the base table while the adapter was unmerged; "
            "the merged model's logits differ from the unmerged model's, as with PEFT's tied lm_head. "
            "Keep the adapter unmerged to serve the same outputs.",
            stacklevel=stacklevel + 1,
        )
