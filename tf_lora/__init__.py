"""tf_lora: LoRA adapters and huge sparse embeddings for TensorFlow, as custom ops.

>>> import tf_lora
>>> merged = tf_lora.lora_merge(w, a, b, scale=alpha / rank)
"""

from tf_lora import _quiet
from tf_lora._ensure_tf import ensure_tensorflow as _ensure_tensorflow

# In the `tf-lora` command's process, TensorFlow's start-up lines are held back (tf_lora._quiet).
with _quiet.command_line_start():
    _ensure_tensorflow()

    from tf_lora import adapters, layers
    from tf_lora.layers import inject_lora, merge_and_unload, set_active_adapter
    from tf_lora.python.ops.lora_ops import (
        batched_lora_apply,
        batched_lora_matmul,
        lora_apply,
        lora_matmul,
        lora_merge,
        merge_into_variable,
        unmerge_from_variable,
    )
    from tf_lora.sparse import ShardedSparseTable, SparseTable
    from tf_lora.sparse import initializers as sparse_initializers
    from tf_lora.sparse import optimizers as sparse_optimizers
from tf_lora.version import __version__  # noqa: E402


def __getattr__(name):
    """`tf_lora.rewrite` (the SavedModel rewrites' protobuf surgery) is imported on first use, not by
    `import tf_lora`."""
    if name == "rewrite":
        import importlib  # noqa: PLC0415

        return importlib.import_module("tf_lora.rewrite")
    raise AttributeError(f"module 'tf_lora' has no attribute {name!r}")


__all__ = [
    "__version__",
    "ShardedSparseTable",
    "SparseTable",
    "adapters",
    "batched_lora_apply",
    "batched_lora_matmul",
    "inject_lora",
    "layers",
    "lora_apply",
    "lora_matmul",
    "lora_merge",
    "merge_and_unload",
    "merge_into_variable",
    "rewrite",
    "set_active_adapter",
    "sparse_initializers",
    "sparse_optimizers",
    "unmerge_from_variable",
]
