"""tf_lora: LoRA adapters and huge sparse embeddings for TensorFlow, as custom ops.

>>> import tf_lora
>>> merged = tf_lora.lora_merge(w, a, b, scale=alpha / rank)
"""

from tf_lora._ensure_tf import ensure_tensorflow as _ensure_tensorflow

_ensure_tensorflow()

from tf_lora import adapters, layers, rewrite  # noqa: E402
from tf_lora.layers import inject_lora  # noqa: E402
from tf_lora.python.ops.lora_ops import (  # noqa: E402
    batched_lora_apply,
    batched_lora_matmul,
    lora_apply,
    lora_matmul,
    lora_merge,
    merge_into_variable,
    unmerge_from_variable,
)
from tf_lora.sparse import SparseTable  # noqa: E402
from tf_lora.sparse import initializers as sparse_initializers  # noqa: E402
from tf_lora.sparse import optimizers as sparse_optimizers  # noqa: E402
from tf_lora.version import __version__  # noqa: E402

__all__ = [
    "__version__",
    "SparseTable",
    "adapters",
    "batched_lora_apply",
    "batched_lora_matmul",
    "inject_lora",
    "layers",
    "lora_apply",
    "lora_matmul",
    "lora_merge",
    "merge_into_variable",
    "rewrite",
    "sparse_initializers",
    "sparse_optimizers",
    "unmerge_from_variable",
]
