"""Reading and editing the node lists of GraphDefs and FunctionDefs: the op names rewrites look for, tensor
references (`node:out_arg:index` in functions, `node:index` in graphs), a TF1 graph read like a function,
and renaming a node's outputs."""

import re
import types

PLUGIN_PREFIX = "TfLora>"
SPARSE_TABLE_PULL = "TfLora>SparseTablePull"
VARIABLE_OPS = ("VarHandleOp", "VariableV2", "Variable")
CALL_OPS = ("StatefulPartitionedCall", "PartitionedCall")
IF_OPS = ("If", "StatelessIf")
# Functions TensorFlow writes to save and restore the checkpoint: they touch every variable, never a model op.
SAVER_FUNCTIONS = ("__inference__traced_save_", "__inference__traced_restore_")


def called(node):
    """The functions a node runs with its data inputs as their arguments, as [(function, the first data
    input that is their first argument)]: a call op's function, or both branches of an If (whose first
    input is the condition). Empty for any other node."""
    if node.op in CALL_OPS:
        return [(node.attr["f"].func.name, 0)]
    if node.op in IF_OPS:
        return [(node.attr["then_branch"].func.name, 1), (node.attr["else_branch"].func.name, 1)]
    return []


def with_callees(functions, names):
    """`names` and every function of `functions` ({name: FunctionDef}) they call, at any depth (calls, If
    branches)."""
    found, queue = set(names), list(names)
    while queue:
        fdef = functions.get(queue.pop())
        for node in fdef.node_def if fdef is not None else ():
            for callee, _ in called(node):
                if callee not in found:
                    found.add(callee)
                    queue.append(callee)
    return found


def identifier(name):
    """`name` with every character other than a letter, digit or `_` as `_`: an object graph attribute."""
    return re.sub(r"[^0-9A-Za-z_]", "_", name)


def split_ref(ref):
    """A FunctionDef input `node:out_arg:index` (or an argument name), or a GraphDef input `node:index` (or
    `node`), as (node, out_arg or None, index)."""
    parts = ref.split(":")
    if len(parts) == 1:
        return parts[0], None, 0
    if len(parts) == 2:
        return parts[0], None, int(parts[1])
    return parts[0], parts[1], int(parts[2])


class GraphBody:
    """The top-level graph of a TF1 model, read like a FunctionDef: `signature.name`, `node_def`, and `ret`
    (the tensors the signatures fetch, so that they count as consumers)."""

    def __init__(self, meta):
        self.signature = types.SimpleNamespace(name="graph")
        self.node_def = meta.graph_def.node
        self.ret = {
            f"{name}/{key}": info.name
            for name, sig in meta.signature_def.items()
            for key, info in sig.outputs.items()
            if info.name
        }


def rename_output(fdef, node_name, old_arg, new_arg):
    """References to `node_name`'s output `old_arg` (FunctionDef naming) become `new_arg`: what a node that
    changes op in place needs (GraphDef references name outputs by index, so there is nothing to do)."""
    rename_node(fdef, node_name, node_name, {old_arg: new_arg})


def rename_node(fdef, old, new, outputs):
    """References to node `old` (data, control, the function's returns) become references to `new`, its
    outputs renamed by `outputs` {old output arg: new}."""

    def renamed(ref):
        if ref == f"^{old}":
            return f"^{new}"
        node, arg, index = split_ref(ref)
        return f"{new}:{outputs.get(arg, arg)}:{index}" if node == old and arg is not None else ref

    for node in fdef.node_def:
        node.input[:] = [renamed(ref) for ref in node.input]
    for key, ref in fdef.ret.items():
        fdef.ret[key] = renamed(ref)
    for key, ref in getattr(fdef, "control_ret", {}).items():  # a TF1 graph (GraphBody) has none
        if ref == old:
            fdef.control_ret[key] = new


def stripped_op_names(meta):
    """Every op the meta graph's graph and functions use."""
    ops = {n.op for n in meta.graph_def.node}
    for f in meta.graph_def.library.function:
        ops.update(n.op for n in f.node_def)
    return ops


def plugin_nodes(meta):
    """`function/node (op)` for every tf_lora op left in the meta graph."""
    found = [f"{n.name} ({n.op})" for n in meta.graph_def.node if n.op.startswith(PLUGIN_PREFIX)]
    for f in meta.graph_def.library.function:
        found += [
            f"{f.signature.name}/{n.name} ({n.op})" for n in f.node_def if n.op.startswith(PLUGIN_PREFIX)
        ]
    return found


def layer_of(variable_name):
    """The layer of a weight variable: its name without the last part (`q_proj/kernel` -> `q_proj`; a bare
    name stays whole)."""
    return variable_name.rsplit("/", 1)[0] if "/" in variable_name else variable_name
