"""inject: new LoRA adapters (A He-uniform, B zero) on the MatMuls of chosen weights of a TF2 SavedModel."""

import dataclasses
import os
import re
import shutil

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import node_def_pb2, types_pb2
from tensorflow.core.protobuf import saved_object_graph_pb2, trackable_object_graph_pb2
from tensorflow.python.framework import dtypes, tensor_util

from tf_lora.rewrite.fold import BATCHED_LORA_APPLY, LORA_APPLY, matmul_under
from tf_lora.rewrite.saved_model import (
    CALL_OPS,
    OBJECT_GRAPH_KEY,
    RewriteError,
    SavedModelFiles,
    write_saved_model,
)


@dataclasses.dataclass
class Injected:
    weight: str  # the base weight's variable name
    a: str  # the new variables' names
    b: str
    shape: tuple  # the weight's [in, out] as the MatMul uses it
    matmuls: list  # "function/node" of each MatMul that got the apply


def inject(model_dir, out_dir, target, rank, alpha, seed=0, overwrite=False, progress=None) -> list:
    """Writes a copy of the SavedModel `model_dir` in which every MatMul whose weight variable matches
    `target` gets a LoRA apply with new adapter variables: A `[in, rank]` He-uniform, B `[rank, out]` zero,
    scale alpha / rank. The outputs are unchanged (B is zero); the adapters are trainable variables of the
    loaded model (`<weight name>/lora_a`, `/lora_b`; attributes `tf_lora_<weight>_lora_a` of its root).

    Args:
      target: A regex, matched in full against each weight variable's name or its layer (the name without
        its last part, so `q_proj` matches `q_proj/kernel`).

    Returns:
      [Injected], one per adapted weight.

    Raises:
      RewriteError: no MatMul matches, a bad rank, or a model this cannot extend; nothing written.
    """
    say = progress or (lambda _msg: None)
    if int(rank) < 1:
        raise RewriteError(f"inject: rank must be >= 1, got {rank}")
    pattern = re.compile(target)
    files = SavedModelFiles(model_dir)
    if files.tf1:
        from tf_lora.rewrite.tf1 import inject_tf1  # noqa: PLC0415

        result = inject_tf1(
            files, out_dir, lambda name: _matches(pattern, name), int(rank), alpha, seed, overwrite, say
        )
        if result is None:
            raise RewriteError(f"inject: no MatMul weight matches {target!r}")
        return result
    checkpoint_graph(files)  # checks that one can be extended
    proto, meta = files.copy_proto()
    functions = {f.signature.name: f for f in meta.graph_def.library.function}

    # Every MatMul on a matching weight, grouped by weight.
    sites = {}
    problems = []
    for fdef in files.model_functions():
        adapted = _adapted_matmuls(fdef)
        for node in fdef.node_def:
            if node.op != "MatMul" or node.attr["transpose_a"].b or node.name in adapted:
                continue
            weight = files.read_variable(fdef, node.input[1])
            if weight is None or not _matches(pattern, weight.name):
                continue
            if len(weight.shape) != 2:
                continue
            sites.setdefault(weight.node_id, []).append((fdef.signature.name, node.name))
    for weight_id, matmuls in sites.items():
        transposed = {_matmul(functions, fn, n).attr["transpose_b"].b for fn, n in matmuls}
        if len(transposed) > 1:
            problems.append(
                f"weight {files.variables[weight_id].name!r} is used both as is and transposed "
                f"({[f'{fn}/{n}' for fn, n in matmuls]}); one adapter cannot fit both"
            )
    if problems:
        raise RewriteError("inject: nothing written; " + "; ".join(problems))
    if not sites:
        names = sorted({v.name for v in files.variables.values() if len(v.shape) == 2})
        raise RewriteError(f"inject: no MatMul weight matches {target!r} (2-D variables: {names})")

    rng = np.random.default_rng(seed)
    objects, ckpt = meta.object_graph_def, checkpoint_graph(files)
    new_values, injected = {}, []
    args = _ArgumentAdder(files, meta, functions)
    for weight_id, matmuls in sorted(sites.items()):
        weight = files.variables[weight_id]
        transpose_b = _matmul(functions, *matmuls[0]).attr["transpose_b"].b
        fan_in, fan_out = (weight.shape[1], weight.shape[0]) if transpose_b else weight.shape
        limit = np.sqrt(6.0 / fan_in)
        dtype = np.dtype(dtypes.as_dtype(weight.dtype).as_numpy_dtype)
        values = {
            "lora_a": rng.uniform(-limit, limit, (fan_in, rank)).astype(dtype),
            "lora_b": np.zeros((rank, fan_out), dtype),
        }
        ids = {}
        for part, value in values.items():
            local = _unique_child(objects, f"tf_lora_{re.sub(r'[^0-9A-Za-z_]', '_', weight.name)}_{part}")
            key = f"{local}/.ATTRIBUTES/VARIABLE_VALUE"
            ids[part] = _add_variable(objects, ckpt, local, f"{weight.name}/{part}", value, key)
            new_values[key] = value
        scale = float(alpha) / rank
        for fn, node_name in matmuls:
            say(f"inject {fn}/{node_name}")
            a_arg = args.ensure(fn, ids["lora_a"])
            b_arg = args.ensure(fn, ids["lora_b"])
            _insert_apply(functions[fn], node_name, a_arg, b_arg, scale)
        injected.append(
            Injected(
                weight.name,
                f"{weight.name}/lora_a",
                f"{weight.name}/lora_b",
                (fan_in, fan_out),
                [f"{f}/{n}" for f, n in matmuls],
            )
        )
    new_values[OBJECT_GRAPH_KEY] = np.array(ckpt.SerializeToString(), dtype=object)
    say(f"write {out_dir}")
    write_saved_model(files, proto, new_values, out_dir, overwrite=overwrite, finish=_resave)
    return injected


def _matmul(functions, fn, name):
    return next(n for n in functions[fn].node_def if n.name == name)


def _adapted_matmuls(fdef):
    """MatMuls that already carry a LoRA apply (directly, or after a bias or another apply)."""
    nodes = {n.name: n for n in fdef.node_def}
    applies = [n for n in fdef.node_def if n.op in (LORA_APPLY, BATCHED_LORA_APPLY)]
    return {m.name for m in (matmul_under(nodes, n.input[0]) for n in applies) if m is not None}


def _unique_child(objects, name):
    """`name`, or `name_2`, `name_3`...: a root attribute no other object has (variables share names)."""
    taken = {c.local_name for c in objects.nodes[0].children}
    candidate, k = name, 1
    while candidate in taken:
        k += 1
        candidate = f"{name}_{k}"
    return candidate


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


def _matches(pattern, name):
    layer = name.rsplit("/", 1)[0] if "/" in name else name
    return pattern.fullmatch(name) is not None or pattern.fullmatch(layer) is not None


def _add_variable(objects, ckpt, local_name, name, value, key):
    """A trainable variable as a child of the root, in the SavedModel's object graph and the checkpoint's."""
    node_id = len(objects.nodes)
    saved = objects.nodes.add()
    saved.variable.CopyFrom(
        saved_object_graph_pb2.SavedVariable(
            dtype=dtypes.as_dtype(value.dtype).as_datatype_enum,
            shape=tf.TensorShape(value.shape).as_proto(),
            trainable=True,
            name=name,
        )
    )
    node = ckpt.nodes.add()
    node.attributes.add(name="VARIABLE_VALUE", full_name=name, checkpoint_key=key)
    references = [(0, local_name)]
    # Keras exports keep lists of the model's variables on the root: the new ones join them.
    for child in objects.nodes[0].children:
        if child.local_name in ("variables", "trainable_variables"):
            listed = objects.nodes[child.node_id].children
            if all(c.local_name.isdigit() for c in listed):
                references.append((child.node_id, str(len(listed))))
    for parent, local in references:
        objects.nodes[parent].children.add(node_id=node_id, local_name=local)
        ckpt.nodes[parent].children.add(node_id=node_id, local_name=local)
    return node_id


class _ArgumentAdder:
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
            raise RewriteError(
                f"inject: function {fn} is neither a saved concrete function nor called by one"
            )
        return name


def _insert_apply(fdef, matmul_name, a_arg, b_arg, scale):
    """y = MatMul(x, w) becomes y = LoraApply(MatMul(x, w), x, read(a), read(b), scale) for every consumer."""
    matmul = next(n for n in fdef.node_def if n.name == matmul_name)
    dtype = matmul.attr["T"].type
    prefix = f"{matmul_name}/tf_lora_inject"
    reads = []
    for part, arg in (("a", a_arg), ("b", b_arg)):
        read = node_def_pb2.NodeDef(name=f"{prefix}/read_{part}", op="ReadVariableOp", input=[arg])
        read.attr["dtype"].type = dtype
        fdef.node_def.append(read)
        reads.append(f"{read.name}:value:0")
    const = node_def_pb2.NodeDef(name=f"{prefix}/scale", op="Const")
    const.attr["dtype"].type = dtype
    const.attr["value"].tensor.CopyFrom(
        tensor_util.make_tensor_proto(np.array(scale, dtypes.as_dtype(dtype).as_numpy_dtype))
    )
    fdef.node_def.append(const)
    product = f"{matmul_name}:product:0"
    apply = node_def_pb2.NodeDef(
        name=f"{prefix}/LoraApply",
        op=LORA_APPLY,
        input=[product, matmul.input[0], *reads, f"{const.name}:output:0"],
    )
    apply.attr["T"].type = dtype
    for node in fdef.node_def:
        for k, ref in enumerate(node.input):
            if ref == product:
                node.input[k] = f"{apply.name}:y_out:0"
    for key, ref in fdef.ret.items():
        if ref == product:
            fdef.ret[key] = f"{apply.name}:y_out:0"
    fdef.node_def.append(apply)


def _resave(staging):
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
