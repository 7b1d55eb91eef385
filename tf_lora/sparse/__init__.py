"""Sparse embedding tables: ids from an unbounded space, trained in place."""

from tf_lora.sparse import initializers, optimizers
from tf_lora.sparse.sharded_table import ShardedSparseTable
from tf_lora.sparse.table import SparseTable

__all__ = ["ShardedSparseTable", "SparseTable", "initializers", "optimizers"]
