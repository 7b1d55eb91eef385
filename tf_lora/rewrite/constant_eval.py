"""A small constant evaluator: the value of a tensor of a model function that depends only on constants and
saved variables (adapter weights, scales), each op run by TensorFlow itself in a throwaway graph."""

import tensorflow as tf
from tensorflow.core.framework import node_def_pb2
from tensorflow.python.framework import op_def_registry, tensor_util

from tf_lora.rewrite.errors import RewriteError
from tf_lora.rewrite.graph_defs import CALL_OPS, PLUGIN_PREFIX, VARIABLE_OPS, split_ref


def evaluate(files, fdef, ref, _memo=None):
    """The value of a tensor of a function that depends only on constants and saved variables.

    Raises:
      RewriteError: the tensor depends on an input, or on an op that cannot be evaluated here.
    """
    memo = {} if _memo is None else _memo
    if ref in memo:
        return memo[ref]
    nodes = files.nodes(fdef)
    node_name, out_arg, index = split_ref(ref)
    node = nodes.get(node_name)
    where = f"{fdef.signature.name}/{node_name}"
    if node is None:
        raise RewriteError(f"{where}: depends on the function input {node_name!r}, not only on variables")
    if node.op == "Const":
        value = tensor_util.MakeNdarray(node.attr["value"].tensor)
    elif node.op in ("ReadVariableOp", "Identity", *VARIABLE_OPS) and files.read_variable(fdef, ref):
        value = files.value(files.read_variable(fdef, ref))
    elif node.op == "ReadVariableOp" or node.op in VARIABLE_OPS:
        variable = files.read_variable(fdef, ref)
        if variable is None:
            raise RewriteError(f"{where}: reads a resource that is not a saved variable")
        value = files.value(variable)
    elif node.op in CALL_OPS or node.op.startswith(PLUGIN_PREFIX) or node.op == "Placeholder":
        raise RewriteError(f"{where}: a {node.op} op, not a constant expression of variables")
    else:
        inputs = [evaluate(files, fdef, i, memo) for i in node.input if not i.startswith("^")]
        value = _run_op(node, inputs, _flat_output_index(node, out_arg, index))
    memo[ref] = value
    return value


def _flat_output_index(node, out_arg, index):
    """The position among a node's outputs of `out_arg:index` (FunctionDef naming), from the op's OpDef."""
    op_def = op_def_registry.get(node.op)
    if op_def is None or out_arg is None:
        return index
    flat = 0
    for arg in op_def.output_arg:
        if arg.name == out_arg:
            return flat + index
        if arg.number_attr:
            flat += node.attr[arg.number_attr].i
        elif arg.type_list_attr:
            flat += len(node.attr[arg.type_list_attr].list.type)
        else:
            flat += 1
    raise RewriteError(f"{node.name}: {node.op} has no output {out_arg!r}")


def _run_op(node, inputs, output_index):
    """Runs one stock op on numpy inputs in a throwaway graph."""
    graph = tf.Graph()
    with graph.as_default():
        feeds = [tf.constant(v, name=f"input_{i}") for i, v in enumerate(inputs)]
        op = node_def_pb2.NodeDef()
        op.CopyFrom(node)
        op.name, op.device = "op", ""
        if "_class" in op.attr:  # colocation with nodes that are not in this graph
            del op.attr["_class"]
        del op.input[:]
        op.input.extend(t.op.name for t in feeds)
        graph_def = graph.as_graph_def()
        graph_def.node.append(op)
    run = tf.Graph()
    with run.as_default():
        try:
            tf.graph_util.import_graph_def(graph_def, name="")
            with tf.compat.v1.Session(graph=run) as session:
                return session.run(f"op:{output_index}")
        except (tf.errors.OpError, ValueError) as e:
            raise RewriteError(f"{node.name}: cannot evaluate {node.op} ({e})") from None
