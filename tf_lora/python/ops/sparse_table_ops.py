"""Sparse embedding table ops: thin wrappers over gen_sparse_table_ops (see tf_lora.SparseTable)."""

import functools

import tensorflow as tf

from tf_lora.python.ops import gen_sparse_table_ops
from tf_lora.python.ops.xla import refuse_xla


def _outside_xla(op):
    """`op`, refusing with a clear error inside an XLA-compiled function (tf_lora.python.ops.xla)."""

    @functools.wraps(op)
    def run(*args, **kwargs):
        refuse_xla(f"the sparse-table op {op.__name__}")
        return op(*args, **kwargs)

    return run


create = _outside_xla(gen_sparse_table_ops.tf_lora_sparse_table)
pull = _outside_xla(gen_sparse_table_ops.tf_lora_sparse_table_pull)
push = _outside_xla(gen_sparse_table_ops.tf_lora_sparse_table_push)
size = _outside_xla(gen_sparse_table_ops.tf_lora_sparse_table_size)
export = _outside_xla(gen_sparse_table_ops.tf_lora_sparse_table_export)
import_ = _outside_xla(gen_sparse_table_ops.tf_lora_sparse_table_import)
remove = _outside_xla(gen_sparse_table_ops.tf_lora_sparse_table_remove)
evict = _outside_xla(gen_sparse_table_ops.tf_lora_sparse_table_evict)

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
