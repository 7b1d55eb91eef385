"""Shared by the rewrites that add variables to a TF2 SavedModel (inject, replace-embedding, densify):
extending the checkpoint's object graph, threading new resources into functions as arguments, and having
TensorFlow re-save the result."""

import os
import shutil
import tempfile
import uuid

import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import saved_object_graph_pb2, trackable_object_graph_pb2
from tensorflow.python.framework import dtypes

from tf_lora.rewrite.errors import RewriteError
from tf_lora.rewrite.graph_defs import SAVER_FUNCTIONS, called, layer_of
from tf_lora.rewrite.model_files import ModelFiles


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


def unique_child(objects, name):
    """`name`, or `name_2`, `name_3`...: a root attribute no other object has (variables share names)."""
    taken = {c.local_name for c in objects.nodes[0].children}
    candidate, k = name, 1
    while candidate in taken:
        k += 1
        candidate = f"{name}_{k}"
    return candidate


def add_variable(objects, ckpt, local_name, name, value, key, trainable=True):
    """A variable as a child of the root, in the SavedModel's object graph and the checkpoint's; returns its
    node id."""
    node_id = len(objects.nodes)
    saved = objects.nodes.add()
    saved.variable.CopyFrom(
        saved_object_graph_pb2.SavedVariable(
            dtype=dtypes.as_dtype(value.dtype).as_datatype_enum,
            shape=tf.TensorShape(value.shape).as_proto(),
            trainable=trainable,
            name=name,
        )
    )
    node = ckpt.nodes.add()
    node.attributes.add(name="VARIABLE_VALUE", full_name=name, checkpoint_key=key)
    objects.nodes[0].children.add(node_id=node_id, local_name=local_name)
    ckpt.nodes[0].children.add(node_id=node_id, local_name=local_name)
    list_variable(objects, ckpt, node_id, trainable)
    return node_id


def list_variable(objects, ckpt, node_id, trainable):
    """Keras exports keep lists of the model's variables on the root (`variables`, `trainable_variables`,
    `non_trainable_variables`): a new variable joins them."""
    for child in objects.nodes[0].children:
        if child.local_name in (
            "variables",
            "trainable_variables" if trainable else "non_trainable_variables",
        ):
            listed = objects.nodes[child.node_id].children
            if all(c.local_name.isdigit() for c in listed):
                position = str(len(listed))
                objects.nodes[child.node_id].children.add(node_id=node_id, local_name=position)
                ckpt.nodes[child.node_id].children.add(node_id=node_id, local_name=position)


def donor(module):
    """`module` saved by TensorFlow and read back (ModelFiles): the pieces its objects need in a SavedModel
    (resource nodes, creator/initializer functions, save/restore functions), for `transplant`. Its protos
    only: the directory is gone once this returns, so its checkpoint's values cannot be read."""
    with tempfile.TemporaryDirectory(prefix="tf_lora_donor_") as directory:
        tf.saved_model.save(module, directory)
        return ModelFiles(directory)


def reached(objects, starts):
    """The objects `starts` (object graph node ids) reach, themselves first: children, dependencies,
    save/restore functions and the objects their functions bind; and those functions' names. Returns
    ([node id], {concrete function name})."""
    order, functions, stack = [], set(), list(reversed(starts))
    while stack:
        k = stack.pop()
        if k in order:
            continue
        order.append(k)
        node = objects.nodes[k]
        stack += [c.node_id for c in [*node.children, *node.dependencies]]
        for saveable in node.saveable_objects.values():
            stack += [saveable.save_function, saveable.restore_function]
        names = list(node.function.concrete_functions) if node.HasField("function") else []
        if node.HasField("bare_concrete_function"):
            names.append(node.bare_concrete_function.concrete_function_name)
        for name in names:
            functions.add(name)
            stack += list(objects.concrete_functions[name].bound_inputs)
    return order, functions


def transplant(meta, ckpt, donor_files, names):
    """Copies the donor's root attributes `names` {donor attribute: new root attribute} and every object
    they reach (children, dependencies, save/restore functions, the objects their functions bind) into `meta`
    and its checkpoint object graph `ckpt`, with fresh node ids and function names.

    Returns:
      ({donor attribute: new node id}, {new node id: {checkpoint attribute name: checkpoint key}}): where the
      caller writes the copied objects' values (the donor's values are not copied).
    """
    objects, theirs = meta.object_graph_def, donor_files.meta.object_graph_def
    roots = {c.local_name: c.node_id for c in theirs.nodes[0].children}
    order, reached_functions = reached(theirs, [roots[name] for name in names])
    base = len(objects.nodes)
    new_id = {k: base + i for i, k in enumerate(order)}
    suffix = f"_{uuid.uuid4().int % 10**9}"  # TensorFlow wants function names to end in an integer
    renamed = {n: n + suffix for n in donor_files.functions if not n.startswith(SAVER_FUNCTIONS)}
    for name, new_name in renamed.items():
        fdef = meta.graph_def.library.function.add()
        fdef.CopyFrom(donor_files.functions[name])
        fdef.signature.name = new_name
        for node in fdef.node_def:  # the functions it calls (call ops, If branches) by their new names
            for value in node.attr.values():
                if value.HasField("func") and value.func.name in renamed:
                    value.func.name = renamed[value.func.name]
                for func in value.list.func:
                    func.name = renamed.get(func.name, func.name)
    for name, concrete in theirs.concrete_functions.items():
        if name in reached_functions:
            copy = objects.concrete_functions[renamed[name]]
            copy.CopyFrom(concrete)
            del copy.bound_inputs[:]
            copy.bound_inputs.extend(new_id[i] for i in concrete.bound_inputs)
    donor_ckpt = donor_files.checkpoint_graph
    keys = {}
    for k in order:
        node = objects.nodes.add()
        node.CopyFrom(theirs.nodes[k])
        for child in [*node.children, *node.dependencies]:
            child.node_id = new_id[child.node_id]
        for saveable in node.saveable_objects.values():
            saveable.save_function = new_id[saveable.save_function]
            saveable.restore_function = new_id[saveable.restore_function]
        if node.HasField("function"):
            functions = [renamed[n] for n in node.function.concrete_functions]
            del node.function.concrete_functions[:]
            node.function.concrete_functions.extend(functions)
        if node.HasField("bare_concrete_function"):
            fn = node.bare_concrete_function
            fn.concrete_function_name = renamed[fn.concrete_function_name]
        while len(ckpt.nodes) < new_id[k]:
            ckpt.nodes.add()
        checkpoint_node = ckpt.nodes.add()
        if donor_ckpt is not None and k < len(donor_ckpt.nodes):
            checkpoint_node.CopyFrom(donor_ckpt.nodes[k])
            for child in checkpoint_node.children:
                child.node_id = new_id[child.node_id]
            for attribute in checkpoint_node.attributes:
                old, _, rest = attribute.checkpoint_key.partition("/")
                attribute.checkpoint_key = f"{names.get(old, old)}/{rest}"
                keys.setdefault(new_id[k], {})[attribute.name] = attribute.checkpoint_key
    for name, local in names.items():
        objects.nodes[0].children.add(node_id=new_id[roots[name]], local_name=local)
        ckpt.nodes[0].children.add(node_id=new_id[roots[name]], local_name=local)
    return {name: new_id[roots[name]] for name in names}, keys


class ArgumentAdder:
    """Gives functions resource arguments for new variables: a concrete function of the object graph binds
    it (bound_inputs); a function run by others (a call op's, an If's branch) gets it from each of them,
    which gets it the same way. An If's two branches take the same arguments: both get it."""

    def __init__(self, files, meta, functions):
        self.functions = functions
        self.concrete = meta.object_graph_def.concrete_functions
        self.callers = {}  # function -> [(caller, node)]
        for name, fdef in functions.items():
            for node in fdef.node_def:
                for callee, _ in called(node):
                    self.callers.setdefault(callee, []).append((name, node.name))
        self.args = {}  # (function, variable node id) -> argument name

    def _add(self, fn, node_id):
        fdef = self.functions[fn]
        name = f"tf_lora_resource_{node_id}"
        index = len(fdef.signature.input_arg)
        fdef.signature.input_arg.add(name=name, type=types_pb2.DT_RESOURCE)
        if "_input_shapes" in fdef.attr:  # one shape per argument; a resource handle is a scalar
            fdef.attr["_input_shapes"].list.shape.add()
        fdef.arg_attr[index].attr["_user_specified_name"].s = b"resource"
        self.args[(fn, node_id)] = name
        return name

    def ensure(self, fn, node_id):
        if (fn, node_id) in self.args:
            return self.args[(fn, node_id)]
        name = self._add(fn, node_id)
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
            for sibling, _ in called(node):  # the If's other branch takes the new input too
                if (sibling, node_id) not in self.args:
                    self._add(sibling, node_id)
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
