"""Which saved variable a model's tensors are: checkpoint keys of a TF2 object graph's variables, of a TF1
Saver's variables, and the variable behind each resource argument of a TF2 function."""

import dataclasses

from tensorflow.python.framework import tensor_util

from tf_lora.rewrite.graph_defs import VARIABLE_OPS, called, split_ref


@dataclasses.dataclass
class Variable:
    node_id: object  # the object graph's node id (TF2), or the variable op's name (TF1 graphs)
    name: str  # the variable's own name, e.g. "dense/kernel"
    key: str  # its checkpoint key
    shape: tuple
    dtype: str


def object_graph_variables(meta, checkpoint_graph, shapes, dtypes):
    """{object graph node id: Variable} of a TF2 SavedModel, keyed as its checkpoint's object graph says."""
    found = {}
    for node_id, node in enumerate(meta.object_graph_def.nodes):
        if node.WhichOneof("kind") != "variable" or node_id >= len(checkpoint_graph.nodes):
            continue
        keys = [
            a.checkpoint_key for a in checkpoint_graph.nodes[node_id].attributes if a.name == "VARIABLE_VALUE"
        ]
        if keys and keys[0] in shapes:
            key = keys[0]
            found[node_id] = Variable(node_id, node.variable.name, key, tuple(shapes[key]), dtypes[key].name)
    return found


def saver_variables(meta, shapes, dtypes):
    """{variable op name: Variable} of a TF1 graph, keyed in the checkpoint as its Saver writes them (a
    variable no SaveV2 names is keyed by its op's name, as a default Saver does)."""
    nodes = {n.name: n for n in meta.graph_def.node}
    keys = {}
    for node in meta.graph_def.node:  # the Saver's SaveV2: tensor_names[i] is tensors[i]'s key
        if node.op != "SaveV2":
            continue
        names_node = nodes.get(split_ref(node.input[1])[0])
        if names_node is None or names_node.op != "Const":
            continue
        names = [n.decode() for n in tensor_util.MakeNdarray(names_node.attr["value"].tensor).ravel()]
        for key, ref in zip(names, node.input[3:], strict=False):
            source = nodes.get(split_ref(ref)[0])
            while source is not None and source.op in ("Identity", "ReadVariableOp"):
                source = nodes.get(split_ref(source.input[0])[0])
            if source is not None and source.op in VARIABLE_OPS:
                keys[source.name] = key
    found = {}
    for node in meta.graph_def.node:
        key = keys.get(node.name, node.name)
        if node.op in VARIABLE_OPS and key in shapes:
            found[node.name] = Variable(node.name, node.name, key, tuple(shapes[key]), dtypes[key].name)
    return found


def resource_arguments(meta, functions, variables):
    """{(function, argument name): Variable} for every resource argument of `functions` that is one of
    `variables` (by object graph node id): bound inputs of the saved concrete functions, then, through call
    ops and If branches (graph_defs.called), the arguments of the functions they run."""
    resolved = {}
    for name, concrete in meta.object_graph_def.concrete_functions.items():
        fdef = functions.get(name)
        if fdef is None or not concrete.bound_inputs:
            continue
        args = fdef.signature.input_arg[-len(concrete.bound_inputs) :]
        for arg, node_id in zip(args, concrete.bound_inputs, strict=True):
            if node_id in variables:
                resolved[(name, arg.name)] = variables[node_id]
    changed = True
    while changed:  # into the functions that nodes run, until nothing new is learnt
        changed = False
        for name, fdef in functions.items():
            for node in fdef.node_def:
                for callee_name, first in called(node):
                    if callee_name not in functions:
                        continue
                    callee = functions[callee_name]
                    data_inputs = [i for i in node.input if not i.startswith("^")][first:]
                    for arg, ref in zip(callee.signature.input_arg, data_inputs, strict=False):
                        variable = resolved.get((name, ref))
                        key = (callee_name, arg.name)
                        if variable is not None and key not in resolved:
                            resolved[key] = variable
                            changed = True
    return resolved
