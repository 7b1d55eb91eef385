"""Sparse embedding table ops: thin wrappers over gen_sparse_table_ops (see tf_lora.SparseTable)."""

import tensorflow as tf

from tf_lora.python.ops import gen_sparse_table_ops

create = gen_sparse_table_ops.tf_lora_sparse_table
pull = gen_sparse_table_ops.tf_lora_sparse_table_pull
push = gen_sparse_table_ops.tf_lora_sparse_table_push
size = gen_sparse_table_ops.tf_lora_sparse_table_size
export = gen_sparse_table_ops.tf_lora_sparse_table_export
import_ = gen_sparse_table_ops.tf_lora_sparse_table_import
remove = gen_sparse_table_ops.tf_lora_sparse_table_remove
evict = gen_sparse_table_ops.tf_lora_sparse_table_evict

# No op of the family has a differentiable input: the table is a resource, ids are int64, and a pull's rows
# reach the table's values through push (tf_lora.layers.SparseEmbedding pushes when the optimizer applies).
# Said explicitly, so a tape or tf.gradients reaching these ops stops there instead of looking for a gradient.
for _op in (
    "SparseTable",
    "SparseTablePull",
    "SparseTablePush",
    "SparseTableSize",
    "SparseTableExport",
    "SparseTableImport",
    "SparseTableRemove",
    "SparseTableEvict",
):
    tf.no_gradient("TfLora>" + _op)
