"""Batched-MatMul projections: a `BatchMatMulV2` whose second operand is a weight variable made a matrix by
reshapes and transposes. TensorFlow runs Keras's `EinsumDense` that way whenever Keras can write the einsum
as one matmul: always for a 2-D kernel (`btd,df->btf`, Gemma's feed-forward), and for the attention
projections (`btd,dnh->btnh`, `btnh,nhd->btd`) once the sequence length is fixed, as in an export with
a fixed-length signature. Rewrites see such a weight as the matrix `[in, out]` the BatchMatMul multiplies its
input's last axis by, element for element: `MatrixView.index[i, j]` is where that matrix's element `(i, j)`
sits in the variable."""

import dataclasses

import numpy as np

from tf_lora.rewrite.errors import RewriteError
from tf_lora.rewrite.graph_defs import split_ref

BATCH_MATMULS = ("BatchMatMulV2", "BatchMatMulV3", "BatchMatMul")
# Ops between a weight variable's read and the BatchMatMul that multiplies by it.
_LAYOUT_OPS = ("Reshape", "Transpose")


@dataclasses.dataclass(frozen=True)
class MatrixView:
    """A weight variable of `kernel_shape` as the matrix `[in, out]` a BatchMatMul uses."""

    kernel_shape: tuple
    index: np.ndarray  # [in, out]: flat positions in the variable

    @property
    def in_features(self):
        return self.index.shape[0]

    @property
    def out_features(self):
        return self.index.shape[1]

    def to_kernel_layout(self, matrix):
        """A numpy matrix `[in, out]` in the variable's own layout."""
        matrix = np.asarray(matrix)
        out = np.empty(int(np.prod(self.kernel_shape, dtype=np.int64)), matrix.dtype)
        out[self.index.ravel()] = matrix.ravel()
        return out.reshape(self.kernel_shape)


def is_batch_projection(node) -> bool:
    """Whether a node is a BatchMatMul of an untransposed input (its second operand may then be a weight)."""
    return (
        node.op in BATCH_MATMULS
        and not node.attr["adj_x"].b
        and len([i for i in node.input if not i.startswith("^")]) == 2
    )


def matrix_view(files, fdef, node, through_cast=False):
    """The weight Variable a BatchMatMul multiplies by and its MatrixView, or None when its second operand is
    not a saved variable (attention scores), or not a matrix once reshaped.

    The operand may reach the BatchMatMul through Identity, Reshape and Transpose (with constant shapes and
    permutations), and with `through_cast` Cast (a mixed-precision layer's weight in its compute dtype)."""
    nodes = files.nodes(fdef)
    ref, layout = node.input[1], []
    source = nodes.get(split_ref(ref)[0])
    while source is not None and (
        source.op in ("Identity", *_LAYOUT_OPS) or (through_cast and source.op == "Cast")
    ):
        if source.op in _LAYOUT_OPS:
            layout.append(source)
        ref = source.input[0]
        source = nodes.get(split_ref(ref)[0])
    weight = files.read_variable(fdef, ref)
    if weight is None:
        return None
    index = np.arange(int(np.prod(weight.shape, dtype=np.int64))).reshape(weight.shape)
    try:
        for op in reversed(layout):
            argument = np.asarray(files.evaluate(fdef, op.input[1])).astype(np.int64).tolist()
            index = np.reshape(index, argument) if op.op == "Reshape" else np.transpose(index, argument)
    except (RewriteError, ValueError):  # a shape that depends on the input, or one that does not fit
        return None
    if index.ndim != 2:
        return None
    if node.attr["adj_y"].b:
        index = index.T
    return weight, MatrixView(tuple(weight.shape), np.ascontiguousarray(index))
