"""Sparse embedding table ops: thin wrappers over gen_sparse_table_ops (see tf_lora.SparseTable)."""

from tf_lora.python.ops import gen_sparse_table_ops

create = gen_sparse_table_ops.tf_lora_sparse_table
pull = gen_sparse_table_ops.tf_lora_sparse_table_pull
push = gen_sparse_table_ops.tf_lora_sparse_table_push
size = gen_sparse_table_ops.tf_lora_sparse_table_size
export = gen_sparse_table_ops.tf_lora_sparse_table_export
import_ = gen_sparse_table_ops.tf_lora_sparse_table_import
remove = gen_sparse_table_ops.tf_lora_sparse_table_remove
evict = gen_sparse_table_ops.tf_lora_sparse_table_evict
