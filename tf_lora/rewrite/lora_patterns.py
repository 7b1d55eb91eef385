"""The tf_lora ops rewrites look for in a graph, and what sits around them: the MatMul, Einsum or BatchMatMul
under a LoRA apply and the weight it multiplies by, the adapters stacked into a BatchedLoraApply."""

from tf_lora.rewrite.batch_matmuls import is_batch_projection, matrix_view
from tf_lora.rewrite.einsum_kernels import einsum_view, is_projection
from tf_lora.rewrite.graph_defs import PLUGIN_PREFIX, split_ref

LORA_APPLY = PLUGIN_PREFIX + "LoraApply"
BATCHED_LORA_APPLY = PLUGIN_PREFIX + "BatchedLoraApply"
# Ops between a MatMul and the LoRA apply that adds to its product: the bias, and other adapters' applies.
PASS_THROUGH = ("BiasAdd", "Identity", LORA_APPLY, BATCHED_LORA_APPLY)


# Ops between an Einsum and the LoRA apply on its rows: the reshapes of its output to `[N, out]` and back.
ROW_RESHAPES = ("Reshape",)
# Ops that read only a tensor's shape: a rewrite that changes the tensor's values leaves them right.
SHAPE_OPS = ("Shape", "ShapeN", "Size", "Rank")


def projection_under(nodes, ref):
    """The MatMul, Einsum or BatchMatMul whose product a LoRA apply's `y` is, None if there is none: a MatMul
    through a bias and other applies; an Einsum of two operands or a BatchMatMul (batch_matmuls) through those
    and the reshapes of its output to rows `[N, out]` and back (what LoraEinsumDense writes and inject
    inserts)."""
    node = nodes.get(split_ref(ref)[0])
    reshaped = False
    while node is not None and (node.op in PASS_THROUGH or node.op in ROW_RESHAPES):
        reshaped = reshaped or node.op in ROW_RESHAPES
        node = nodes.get(split_ref(node.input[0])[0])
    if node is not None and node.op == "MatMul" and not reshaped:
        return node
    return node if node is not None and (is_projection(node) or is_batch_projection(node)) else None


def projection_weight(files, fdef, projection, through_cast=False):
    """The saved Variable a MatMul, Einsum or BatchMatMul multiplies by (its second operand; a BatchMatMul's
    through the reshapes and transposes that make it a matrix), or None. `through_cast`: through a Cast too
    (a mixed-precision layer's weight in its compute dtype)."""
    if is_batch_projection(projection):
        found = matrix_view(files, fdef, projection, through_cast)
        return None if found is None else found[0]
    return files.read_variable(fdef, projection.input[1], through_cast=through_cast)


def projection_view(files, fdef, projection, weight):
    """How an Einsum or a BatchMatMul sees its weight as `[in, out]` (an EinsumView or a MatrixView: both have
    in_features, out_features and to_kernel_layout); None for a MatMul, whose weight is the matrix (or its
    transpose, `transpose_b`).

    Raises:
      RewriteError: an Einsum equation with no `[in, out]` view on its rows (einsum_view).
    """
    if projection.op == "MatMul":
        return None
    if is_batch_projection(projection):
        return matrix_view(files, fdef, projection, through_cast=True)[1]
    return einsum_view(projection, weight.shape, f"{fdef.signature.name}/{projection.name}")


def row_sources(nodes, ref):
    """The tensors `ref` reshapes: `ref` and those behind it through Reshape and Identity (an Einsum's
    input, reshaped to the rows `[N, in]` of its adapter)."""
    found = [split_ref(ref)]
    node = nodes.get(split_ref(ref)[0])
    while node is not None and node.op in (*ROW_RESHAPES, "Identity"):
        found.append(split_ref(node.input[0]))
        node = nodes.get(split_ref(node.input[0])[0])
    return found


def stack_names(files, fdef, nodes, ref, n, ranks=None):
    """Names of the adapters stacked into a_stack: the variables behind a Pack's inputs (through Pad); their
    own ranks (before padding to the stack's) go into `ranks` when given."""
    pack = nodes.get(split_ref(ref)[0])
    names = [f"{split_ref(ref)[0]}[{k}]" for k in range(n)]
    if pack is not None and pack.op == "Pack":
        for k, item in enumerate(i for i in pack.input if not i.startswith("^")):
            source = nodes.get(split_ref(item)[0])
            while source is not None and source.op in ("Pad", "PadV2", "Identity", "Cast"):
                item = source.input[0]
                source = nodes.get(split_ref(item)[0])
            variable = files.read_variable(fdef, item, through_cast=True)
            if variable is not None and k < n:
                names[k] = variable.name
                if ranks is not None and len(variable.shape) == 2:
                    ranks[k] = variable.shape[1]
    return names
