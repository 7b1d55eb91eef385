"""Keras layers of tf_lora."""

from tf_lora.layers.conversion import to_lora
from tf_lora.layers.keras_injection import inject_lora
from tf_lora.layers.kernel_layout import EinsumView
from tf_lora.layers.lora_dense import LoraDense
from tf_lora.layers.lora_einsum_dense import LoraEinsumDense
from tf_lora.layers.lora_embedding import LoraEmbedding
from tf_lora.layers.lora_layer import LoraAdapters, adapter_ids
from tf_lora.layers.lora_model import (
    PerExampleAdapters,
    lora_layers,
    merge,
    merge_and_unload,
    set_active_adapter,
    to_keras_lora,
    unmerge,
)
from tf_lora.layers.sparse_embedding import SparseEmbedding, sparse_table_devices

__all__ = [
    "EinsumView",
    "LoraAdapters",
    "LoraDense",
    "LoraEinsumDense",
    "LoraEmbedding",
    "PerExampleAdapters",
    "SparseEmbedding",
    "adapter_ids",
    "inject_lora",
    "lora_layers",
    "merge",
    "merge_and_unload",
    "set_active_adapter",
    "sparse_table_devices",
    "to_keras_lora",
    "to_lora",
    "unmerge",
]
