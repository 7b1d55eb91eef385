"""inject: new LoRA adapters (A He-uniform, B zero) on the MatMuls of chosen weights of a model (a TF2
SavedModel rewritten as protos; TF1 graphs in a session)."""

import dataclasses
import re

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import node_def_pb2
from tensorflow.core.protobuf import saved_object_graph_pb2
from tensorflow.python.framework import dtypes, tensor_util

from tf_lora.python.ops import lora_ops
from tf_lora.rewrite.errors import RewriteError
from tf_lora.rewrite.graph_edit import ArgumentAdder, checkpoint_graph, name_matches, resave
from tf_lora.rewrite.lora_patterns import BATCHED_LORA_APPLY, LORA_APPLY, matmul_under
from tf_lora.rewrite.model_files import OBJECT_GRAPH_KEY, ModelFiles
from tf_lora.rewrite.saved_model_writer import write_saved_model
from tf_lora.rewrite.tf1_session import all_variables, rewire, session_model, variable_of, write_session

v1 = tf.compat.v1


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
    files = ModelFiles(model_dir)
    if files.tf1:
        result = _inject_tf1(
            files, out_dir, lambda name: name_matches(pattern, name), int(rank), alpha, seed, overwrite, say
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
            if weight is None or not name_matches(pattern, weight.name):
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
    args = ArgumentAdder(files, meta, functions)
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
    write_saved_model(files, proto, new_values, out_dir, overwrite=overwrite, finish=resave)
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


def _inject_tf1(files, out_dir, matches, rank, alpha, seed, overwrite, say):
    """inject on a TF1 graph, in a session (tf1_session)."""
    rng = np.random.default_rng(seed)
    injected = []
    with session_model(files) as (graph, session, signatures):
        sites = {}
        for op in graph.get_operations():
            if op.type != "MatMul" or op.get_attr("transpose_a") or _adapted(op):
                continue
            variable = variable_of(op.inputs[1])
            if variable is not None and matches(variable.name) and op.inputs[1].shape.rank == 2:
                sites.setdefault(variable.name, []).append(op)
        if not sites:
            return None
        mixed = [n for n, ops in sites.items() if len({op.get_attr("transpose_b") for op in ops}) > 1]
        if mixed:
            raise RewriteError(
                f"inject: nothing written; weights used both as is and transposed: {mixed}; one adapter "
                "cannot fit both"
            )
        new_variables = []
        for name, matmuls in sorted(sites.items()):
            weight = matmuls[0].inputs[1]
            transpose_b = matmuls[0].get_attr("transpose_b")
            rows, cols = weight.shape.as_list()
            fan_in, fan_out = (cols, rows) if transpose_b else (rows, cols)
            limit = np.sqrt(6.0 / fan_in)
            dtype = weight.dtype
            with graph.as_default():
                a = v1.get_variable(
                    f"{name}/lora_a",
                    initializer=rng.uniform(-limit, limit, (fan_in, rank)).astype(dtype.as_numpy_dtype),
                    use_resource=True,
                )
                b = v1.get_variable(
                    f"{name}/lora_b",
                    initializer=np.zeros((rank, fan_out), dtype.as_numpy_dtype),
                    use_resource=True,
                )
                new_variables += [a, b]
                for matmul in matmuls:
                    say(f"inject {matmul.name}")
                    y = matmul.outputs[0]
                    out = lora_ops.lora_apply(y, matmul.inputs[0], a, b, float(alpha) / rank)
                    rewire(y, out, signatures, keep={out.op})
            injected.append(
                Injected(name, a.op.name, b.op.name, (fan_in, fan_out), [m.name for m in matmuls])
            )
        session.run(v1.variables_initializer(new_variables))
        say(f"write {out_dir}")
        write_session(files, session, signatures, out_dir, overwrite, all_variables(graph))
    return injected


def _adapted(matmul):
    """Whether a MatMul's product already feeds a LoRA apply (directly or after a bias)."""
    tensors = [matmul.outputs[0]]
    while tensors:
        for consumer in tensors.pop().consumers():
            if consumer.type.startswith("TfLora>") and "LoraApply" in consumer.type:
                return True
            if consumer.type in ("BiasAdd", "Identity"):
                tensors.append(consumer.outputs[0])
    return False
