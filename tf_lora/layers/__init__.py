"""Keras layers of tf_lora."""

from tf_lora.layers.keras_injection import inject_lora
from tf_lora.layers.lora_dense import LoraDense
from tf_lora.layers.sparse_embedding import SparseEmbedding

__all__ = ["LoraDense", "SparseEmbedding", "inject_lora"]
