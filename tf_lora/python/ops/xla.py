"""XLA (`jit_compile=True`) and tf_lora's ops.

XLA compiles only ops it has a lowering for; tf_lora's are custom kernels. Inside an XLA-compiled function
the LoRA ops therefore run as TensorFlow compositions of stock ops (lora_ops), which XLA compiles and
fuses, and the sparse-table ops, whose table lives in host memory, refuse with an error that says what to
do. Keras 3 on a GPU compiles models with XLA by default (`jit_compile="auto"`) unless a layer sets
`supports_jit = False`, which SparseEmbedding does.
"""

import tensorflow as tf


def in_xla_context() -> bool:
    """Whether ops built now are compiled by XLA: inside `tf.function(jit_compile=True)` (Keras'
    `jit_compile=True`), at any depth of nested functions."""
    try:
        from tensorflow.python.ops import control_flow_util  # private: TensorFlow's own test for this
    except ImportError:  # pragma: no cover - a TensorFlow without it compiles nothing with tf_lora here
        return False
    return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


def refuse_xla(what):
    """Raises a clear error when `what` (a sparse-table operation) is built inside an XLA-compiled
    function."""
    if in_xla_context():
        raise ValueError(
            f"{what} cannot be compiled by XLA: a tf_lora sparse table is a hash table in host memory, "
            "which XLA cannot lower. Compile without XLA: model.compile(..., jit_compile=False) (Keras' "
            'default jit_compile="auto" already does, as SparseEmbedding sets supports_jit = False), or '
            "tf.function without jit_compile=True."
        )
