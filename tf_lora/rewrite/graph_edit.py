"""Shared by the rewrites that add variables to a TF2 SavedModel (inject, replace-embedding): extending the
checkpoint's object graph, threading new resources into functions as arguments, and having TensorFlow re-save
the result."""

import os
import shutil

import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import trackable_object_graph_pb2

from tf_lora.rewrite.errors import RewriteError
from tf_lora.rewrite.graph_defs import CALL_OPS, layer_of


def checkpoint_graph(files):
    """A copy of the checkpoint's object graph, padded with empty nodes to the SavedModel's object graph:
    node ids agree in both (the checkpoint's graph is a prefix: functions used only to save, like a
    resource's save_fn, have no checkpoint node), so nodes appended to both keep one id."""
    saved = len(files.meta.object_graph_def.nodes)
    if files.checkpoint_graph is None or len(files.checkpoint_graph.nodes) > saved:
        raise RewriteError(f"{files.path}: object graph and checkpoint do not line up; cannot add objects")
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.CopyFrom(files.checkpoint_graph)
    while len(graph.nodes) < saved:
        graph.nodes.add()
    return graph


def name_matches(pattern, name):
    """Whether `pattern` matches a variable's name, or its layer (the name without the last part), in full."""
    return pattern.fullmatch(name) is not None or pattern.fullmatch(layer_of(name)) is not None


class ArgumentAdder:
    """Gives functions resource arguments for new variables: a concrete function of the object graph binds
    it (bound_inputs); a function called by others gets it from each caller, which gets it the same way."""

    def __init__(self, files, meta, functions):
        self.functions = functions
        self.concrete = meta.object_graph_def.concrete_functions
        self.callers = {}
        for name, fdef in functions.items():
            for node in fdef.node_def:
                if node.op in CALL_OPS:
                    self.callers.setdefault(node.attr["f"].func.name, []).append((name, node.name))
        self.args = {}  # (function, variable node id) -> argument name

    def ensure(self, fn, node_id):
        if (fn, node_id) in self.args:
            return self.args[(fn, node_id)]
        fdef = self.functions[fn]
        name = f"tf_lora_inject_{node_id}_resource"
        index = len(fdef.signature.input_arg)
        fdef.signature.input_arg.add(name=name, type=types_pb2.DT_RESOURCE)
        if "_input_shapes" in fdef.attr:  # one shape per argument; a resource handle is a scalar
            fdef.attr["_input_shapes"].list.shape.add()
        fdef.arg_attr[index].attr["_user_specified_name"].s = b"resource"
        self.args[(fn, node_id)] = name
        if fn in self.concrete:
            self.concrete[fn].bound_inputs.append(node_id)
        for caller, call_node in self.callers.get(fn, []):
            caller_arg = self.ensure(caller, node_id)
            node = next(n for n in self.functions[caller].node_def if n.name == call_node)
            data = [i for i in node.input if not i.startswith("^")]
            control = [i for i in node.input if i.startswith("^")]
            del node.input[:]
            node.input.extend([*data, caller_arg, *control])
            node.attr["Tin"].list.type.append(types_pb2.DT_RESOURCE)
        if fn not in self.concrete and fn not in self.callers:
            raise RewriteError(f"function {fn} is neither a saved concrete function nor called by one")
        return name


def resave(staging):
    """Loads the staged copy with TensorFlow and saves it again, so that TensorFlow itself writes the graph,
    the save/restore functions and the signatures over the new variables (what TF Serving and TF1 loaders
    read)."""
    out = staging + ".resaved"
    shutil.rmtree(out, ignore_errors=True)
    try:
        loaded = tf.saved_model.load(staging)
        signatures = {k: v for k, v in loaded.signatures.items()}
        tf.saved_model.save(loaded, out, signatures=signatures or None)
    except BaseException as e:
        shutil.rmtree(out, ignore_errors=True)
        if isinstance(e, (ValueError, tf.errors.OpError, AssertionError)):
            raise RewriteError(f"the rewritten model does not load back ({e})") from None
        raise
    assert os.path.isdir(out)
    return out
