"""The tf_lora ops rewrites look for in a graph, and what sits around them: the MatMul under a LoRA apply,
the adapters stacked into a BatchedLoraApply."""

from tf_lora.rewrite.graph_defs import PLUGIN_PREFIX, split_ref

LORA_APPLY = PLUGIN_PREFIX + "LoraApply"
BATCHED_LORA_APPLY = PLUGIN_PREFIX + "BatchedLoraApply"
# Ops between a MatMul and the LoRA apply that adds to its product: the bias, and other adapters' applies.
PASS_THROUGH = ("BiasAdd", "Identity", LORA_APPLY, BATCHED_LORA_APPLY)


def matmul_under(nodes, ref):
    """The MatMul whose product a LoRA apply's `y` is, through a bias and other applies; None if there is
    none."""
    node = nodes.get(split_ref(ref)[0])
    while node is not None and node.op in PASS_THROUGH:
        node = nodes.get(split_ref(node.input[0])[0])
    return node if node is not None and node.op == "MatMul" else None


def stack_names(files, fdef, nodes, ref, n, ranks=None):
    """Names of the adapters stacked into a_stack: the variables behind a Pack's inputs (through Pad); their
    own ranks (before padding to the stack's) go into `ranks` when given."""
    pack = nodes.get(split_ref(ref)[0])
    names = [f"{split_ref(ref)[0]}[{k}]" for k in range(n)]
    if pack is not None and pack.op == "Pack":
        for k, item in enumerate(i for i in pack.input if not i.startswith("^")):
            source = nodes.get(split_ref(item)[0])
            while source is not None and source.op in ("Pad", "PadV2", "Identity"):
                item = source.input[0]
                source = nodes.get(split_ref(item)[0])
            variable = files.read_variable(fdef, item)
            if variable is not None and k < n:
                names[k] = variable.name
                if ranks is not None and len(variable.shape) == 2:
                    ranks[k] = variable.shape[1]
    return names
