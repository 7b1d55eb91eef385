"""Sparse embedding tables: ids from an unbounded space, trained in place."""

from tf_lora.sparse import initializers, optimizers
from tf_lora.sparse.table import SparseTable

__all__ = ["SparseTable", "initializers", "optimizers"]
