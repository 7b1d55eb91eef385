"""inject: new LoRA adapters (A He-uniform, B zero) on the MatMuls and Einsum projections of chosen weights of
a model (a TF2 SavedModel rewritten as protos; TF1 graphs, MatMuls only, in a session)."""

import dataclasses
import hashlib
import re

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import node_def_pb2
from tensorflow.python.framework import dtypes, tensor_util

from tf_lora.python.ops import lora_ops
from tf_lora.rewrite.batch_matmuls import is_batch_projection, matrix_view
from tf_lora.rewrite.einsum_kernels import einsum_view, equation, is_projection
from tf_lora.rewrite.errors import RewriteError
from tf_lora.rewrite.graph_defs import identifier
from tf_lora.rewrite.graph_edit import (
    ArgumentAdder,
    add_variable,
    checkpoint_graph,
    name_matches,
    resave,
    unique_child,
)
from tf_lora.rewrite.lora_patterns import BATCHED_LORA_APPLY, LORA_APPLY, projection_under, projection_weight
from tf_lora.rewrite.model_files import OBJECT_GRAPH_KEY, ModelFiles
from tf_lora.rewrite.saved_model_writer import write_saved_model
from tf_lora.rewrite.tf1_session import all_variables, rewire, session_model, variable_of, write_session

v1 = tf.compat.v1
# What adds a bias to a product.
_ADDS = {"BiasAdd", "Add", "AddV2"}


@dataclasses.dataclass
class Injected:
    weight: str  # the base weight's variable name
    a: str  # the new variables' names
    b: str
    shape: tuple  # the weight's [in, out] as the MatMul (through its equation the Einsum, reshaped the
    # BatchMatMul) uses it
    matmuls: list  # "function/node" of each MatMul, Einsum or BatchMatMul that got the apply


@dataclasses.dataclass
class _Site:
    """A MatMul, Einsum or BatchMatMul that gets an apply, and how it sees its weight as `[in, out]`."""

    function: str
    node: str
    how: str  # "as is", "transposed" (a MatMul), "in '<equation>'" (an Einsum), "by BatchMatMulV2"
    shape: tuple  # [in, out]
    layout: tuple  # what makes two sites see the weight alike (_layout)
    view: object  # the Einsum's EinsumView or the BatchMatMul's MatrixView; None for a MatMul


def inject(model_dir, out_dir, target, rank, alpha, seed=0, overwrite=False, progress=None) -> list:
    """Writes a copy of the SavedModel `model_dir` in which every MatMul, Einsum or BatchMatMul projection
    whose weight variable matches `target` gets a LoRA apply with new adapter variables: A `[in, rank]`
    He-uniform, B `[rank, out]` zero, scale alpha / rank. The outputs are unchanged (B is zero); the adapters
    are trainable variables of the loaded model (`<weight name>/lora_a`, `/lora_b`; attributes
    `tf_lora_<weight>_lora_a` of its root).

    An Einsum's kernel is seen as the matrix `[in, out]` through its equation (einsum_kernels: `in` the kernel
    axes the input contracts, `out` those the output keeps, each flattened in kernel order), and the apply
    goes on its rows: `y' = Reshape(LoraApply(Reshape(y, [-1, out]), Reshape(x, [-1, in]), A, B, scale),
    Shape(y))`. That takes an equation whose input ends with the `in` axes and output with the `out` axes
    (every attention projection); a matching Einsum with another is refused. A BatchMatMul multiplies its
    input's last axis by its weight made a matrix (batch_matmuls) and gets the apply on its rows the same
    way.

    Args:
      target: A regex, matched in full against each weight variable's name or its layer (the name without
        its last part, so `q_proj` matches `q_proj/kernel`).

    Returns:
      [Injected], one per adapted weight.

    Raises:
      RewriteError: no MatMul or Einsum weight matches (the message lists those that can take an adapter,
        and says what the target matched instead, such as a bias), a matching Einsum whose equation takes no
        adapter, a bad rank, or a model this cannot extend; nothing written.
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

    # Every MatMul and Einsum on a matching weight, grouped by weight.
    sites = {}
    problems = []
    for fdef in files.model_functions():
        adapted = _adapted_projections(fdef)
        for node in fdef.node_def:
            if not _takes_adapter(node) or node.name in adapted:
                continue
            weight = projection_weight(files, fdef, node)
            if weight is None or not name_matches(pattern, weight.name):
                continue
            try:
                site = _site(files, fdef, node, weight)
            except RewriteError as e:
                problems.append(f"weight {weight.name!r}: {e}")
                continue
            if site is not None:
                sites.setdefault(weight.node_id, []).append(site)
    for weight_id, found in sites.items():
        if len({site.layout for site in found}) > 1:
            problems.append(
                f"weight {files.variables[weight_id].name!r} is used both "
                f"{' and '.join(sorted({site.how for site in found}))} "
                f"({[f'{site.function}/{site.node}' for site in found]}); one adapter cannot fit both"
            )
    if problems:
        raise RewriteError("inject: nothing written; " + "; ".join(problems))
    if not sites:
        raise RewriteError(_nothing_matches(files, pattern, target))

    rng = np.random.default_rng(seed)
    objects, ckpt = meta.object_graph_def, checkpoint_graph(files)
    new_values, injected = {}, []
    args = ArgumentAdder(files, meta, functions)
    for weight_id, found in sorted(sites.items()):
        weight = files.variables[weight_id]
        fan_in, fan_out = found[0].shape
        limit = np.sqrt(6.0 / fan_in)
        dtype = np.dtype(dtypes.as_dtype(weight.dtype).as_numpy_dtype)
        values = {
            "lora_a": rng.uniform(-limit, limit, (fan_in, rank)).astype(dtype),
            "lora_b": np.zeros((rank, fan_out), dtype),
        }
        ids = {}
        for part, value in values.items():
            local = unique_child(objects, f"tf_lora_{identifier(weight.name)}_{part}")
            key = f"{local}/.ATTRIBUTES/VARIABLE_VALUE"
            ids[part] = add_variable(objects, ckpt, local, f"{weight.name}/{part}", value, key)
            new_values[key] = value
        scale = float(alpha) / rank
        for site in found:
            say(f"inject {site.function}/{site.node}")
            a_arg = args.ensure(site.function, ids["lora_a"])
            b_arg = args.ensure(site.function, ids["lora_b"])
            if site.view is None:
                _insert_apply(functions[site.function], site.node, a_arg, b_arg, scale)
            else:
                _insert_rows_apply(functions[site.function], site.node, a_arg, b_arg, scale, site.view)
        injected.append(
            Injected(
                weight.name,
                f"{weight.name}/lora_a",
                f"{weight.name}/lora_b",
                (fan_in, fan_out),
                [f"{site.function}/{site.node}" for site in found],
            )
        )
    new_values[OBJECT_GRAPH_KEY] = np.array(ckpt.SerializeToString(), dtype=object)
    say(f"write {out_dir}")
    write_saved_model(files, proto, new_values, out_dir, overwrite=overwrite, finish=resave)
    return injected


def _takes_adapter(node):
    """Whether a node is a MatMul (of an untransposed input), an Einsum of two operands or a BatchMatMul (of
    an untransposed input): what an adapter can go on when its second input is a weight variable."""
    return (
        (node.op == "MatMul" and not node.attr["transpose_a"].b)
        or is_projection(node)
        or (is_batch_projection(node) and node.op != "BatchMatMulV3")  # V3 (int8 in, int32 out) has no T
    )


def _site(files, fdef, node, weight):
    """How a MatMul, Einsum or BatchMatMul sees its weight as `[in, out]`, as a _Site; None for a MatMul on a
    weight that is not 2-D. Raises RewriteError for an Einsum whose equation takes no adapter
    (einsum_view)."""
    fn = fdef.signature.name
    if node.op == "MatMul":
        if len(weight.shape) != 2:
            return None
        rows, cols = weight.shape
        transposed = node.attr["transpose_b"].b
        index = np.arange(rows * cols).reshape(rows, cols)
        return _Site(
            fn,
            node.name,
            "transposed" if transposed else "as is",
            (cols, rows) if transposed else (rows, cols),
            _layout(index.T if transposed else index),
            None,
        )
    if is_batch_projection(node):
        view = matrix_view(files, fdef, node)[1]
        return _Site(
            fn, node.name, f"by {node.op}", (view.in_features, view.out_features), _layout(view.index), view
        )
    view = einsum_view(node, weight.shape, f"{fn}/{node.name}")
    shape = (view.in_features, view.out_features)
    # The kernel holding each matrix element's own number; sorted, its positions are where each element sits.
    numbered = view.to_kernel_layout(np.arange(view.in_features * view.out_features).reshape(shape))
    index = np.argsort(numbered.ravel(), kind="stable").reshape(shape)
    return _Site(fn, node.name, f"in {equation(node)!r}", shape, _layout(index), view)


def _layout(index):
    """What makes two sites see a weight alike, whatever op they are: its `[in, out]` matrix's positions in
    the variable (a digest of them)."""
    return index.shape, hashlib.sha256(np.ascontiguousarray(index, np.int64).tobytes()).hexdigest()


def _adapted_projections(fdef):
    """MatMuls and Einsums that already carry a LoRA apply (directly, or after a bias, another apply or, for
    an Einsum, the reshapes to its rows)."""
    nodes = {n.name: n for n in fdef.node_def}
    applies = [n for n in fdef.node_def if n.op in (LORA_APPLY, BATCHED_LORA_APPLY)]
    return {m.name for m in (projection_under(nodes, n.input[0]) for n in applies) if m is not None}


def _nothing_matches(files, pattern, target):
    """The error when `target` matches no weight that can take an adapter: it lists those that can (the
    weights of MatMuls and Einsum projections without an adapter, never a bias), and says what `target`
    matched instead: biases (variables that are only added), weights that have an adapter already, other
    variables."""
    weights, adapted, uses, cast = set(), set(), {}, set()
    for fdef in files.model_functions():
        consumers = files.consumers(fdef)
        has_adapter = _adapted_projections(fdef)
        for node in fdef.node_def:
            weight = projection_weight(files, fdef, node) if _takes_adapter(node) else None
            if weight is None and _takes_adapter(node):
                through = projection_weight(files, fdef, node, through_cast=True)
                if through is not None:  # a mixed-precision layer's weight, cast to its compute dtype
                    cast.add(through.name)
            if weight is not None and node.name in has_adapter:
                adapted.add(weight.name)
            elif weight is not None:
                try:
                    if _site(files, fdef, node, weight) is not None:
                        weights.add(weight.name)
                except RewriteError:
                    pass
            variable = files.read_variable(fdef, node.name) if node.op == "ReadVariableOp" else None
            if variable is not None:
                uses.setdefault(variable.name, set()).update(u.op for u in _value_users(consumers, node))
    listing = f"weights that can take an adapter: {sorted(weights)}"
    nothing = f"inject: no MatMul weight matches {target!r}, nor any Einsum kernel"
    matched = sorted({v.name for v in files.variables.values() if name_matches(pattern, v.name)} - weights)
    if not matched:
        return f"{nothing} ({listing})"
    biases = [n for n in matched if n not in adapted and uses.get(n) and uses[n] <= _ADDS]
    have = [n for n in matched if n in adapted]
    casts = [n for n in matched if n in cast and n not in adapted]
    others = [n for n in matched if n not in biases and n not in adapted and n not in casts]
    parts = []
    if casts:
        parts.append(
            f"weights cast to another dtype before their MatMul or Einsum {casts} (a mixed-precision model: "
            "inject adds adapters to float graphs whose projections multiply the weight itself; inject in "
            "Keras with tf_lora.inject_lora and export again)"
        )
    if biases:
        parts.append(
            f"biases {biases} (an adapter goes on the weight a MatMul or Einsum multiplies by, not on a bias "
            "added to its product)"
        )
    if have:
        parts.append(f"weights that already have a LoRA adapter {have}")
    if others:
        parts.append(f"variables that no MatMul or Einsum multiplies by {others}")
    return f"{nothing}: it matches only {' and '.join(parts)}; {listing}"


def _value_users(consumers, node):
    """The nodes that use a node's value, through Cast and Identity."""
    found = []
    for user in consumers.get(node.name, ()):
        found += _value_users(consumers, user) if user.op in ("Cast", "Identity") else [user]
    return found


def _insert_apply(fdef, matmul_name, a_arg, b_arg, scale):
    """y = MatMul(x, w) becomes y = LoraApply(MatMul(x, w), x, read(a), read(b), scale) for every consumer."""
    matmul = next(n for n in fdef.node_def if n.name == matmul_name)
    dtype = matmul.attr["T"].type
    prefix = f"{matmul_name}/tf_lora_inject"
    product = f"{matmul_name}:product:0"
    apply = _apply_node(fdef, prefix, dtype, product, matmul.input[0], a_arg, b_arg, scale)
    _rewire(fdef, product, f"{apply.name}:y_out:0")
    fdef.node_def.append(apply)


def _insert_rows_apply(fdef, einsum_name, a_arg, b_arg, scale, view):
    """y = Einsum(x, kernel) (or BatchMatMul(x, kernel as a matrix)) becomes, for every consumer, the apply on
    its rows as LoraEinsumDense computes it: y' = Reshape(LoraApply(Reshape(y, [-1, out]), Reshape(x, [-1,
    in]), read(a), read(b), scale), Shape(y)). The rows line up with reshapes alone (einsum_view checked the
    equation; a BatchMatMul's input ends with its `in` axis)."""
    einsum = next(n for n in fdef.node_def if n.name == einsum_name)
    dtype = einsum.attr["T"].type
    prefix = f"{einsum_name}/tf_lora_inject"
    product = f"{einsum_name}:output:0"
    shape = node_def_pb2.NodeDef(name=f"{prefix}/shape", op="Shape", input=[product])
    shape.attr["T"].type = dtype
    shape.attr["out_type"].type = dtypes.int32.as_datatype_enum
    x_rows = _reshape(f"{prefix}/x_rows", einsum.input[0], dtype, [-1, view.in_features])
    y_rows = _reshape(f"{prefix}/y_rows", product, dtype, [-1, view.out_features])
    apply = _apply_node(
        fdef, prefix, dtype, f"{y_rows[-1].name}:output:0", f"{x_rows[-1].name}:output:0", a_arg, b_arg, scale
    )
    back = node_def_pb2.NodeDef(
        name=f"{prefix}/y", op="Reshape", input=[f"{apply.name}:y_out:0", f"{shape.name}:output:0"]
    )
    back.attr["T"].type = dtype
    back.attr["Tshape"].type = dtypes.int32.as_datatype_enum
    _rewire(fdef, product, f"{back.name}:output:0")  # before the new nodes that read the Einsum's output
    fdef.node_def.extend([shape, *x_rows, *y_rows, apply, back])


def _reshape(name, ref, dtype, dims):
    """The nodes of Reshape(ref, dims): the Const of dims, then the Reshape named `name`."""
    dims_const = _const(f"{name}/shape", np.array(dims, np.int32))
    reshape = node_def_pb2.NodeDef(name=name, op="Reshape", input=[ref, f"{dims_const.name}:output:0"])
    reshape.attr["T"].type = dtype
    reshape.attr["Tshape"].type = dtypes.int32.as_datatype_enum
    return [dims_const, reshape]


def _apply_node(fdef, prefix, dtype, y_ref, x_ref, a_arg, b_arg, scale):
    """A LoraApply node on (y, x) with reads of the adapter's resources and a Const scale; the reads and the
    Const join the function, the apply is returned for the caller to place."""
    reads = []
    for part, arg in (("a", a_arg), ("b", b_arg)):
        read = node_def_pb2.NodeDef(name=f"{prefix}/read_{part}", op="ReadVariableOp", input=[arg])
        read.attr["dtype"].type = dtype
        fdef.node_def.append(read)
        reads.append(f"{read.name}:value:0")
    const = _const(f"{prefix}/scale", np.array(scale, dtypes.as_dtype(dtype).as_numpy_dtype))
    fdef.node_def.append(const)
    apply = node_def_pb2.NodeDef(
        name=f"{prefix}/LoraApply", op=LORA_APPLY, input=[y_ref, x_ref, *reads, f"{const.name}:output:0"]
    )
    apply.attr["T"].type = dtype
    return apply


def _const(name, value):
    const = node_def_pb2.NodeDef(name=name, op="Const")
    const.attr["dtype"].type = dtypes.as_dtype(value.dtype).as_datatype_enum
    const.attr["value"].tensor.CopyFrom(tensor_util.make_tensor_proto(value))
    return const


def _rewire(fdef, old, new):
    """Every input of the function's nodes, and every output of the function, that is `old` becomes `new`."""
    for node in fdef.node_def:
        for k, ref in enumerate(node.input):
            if ref == old:
                node.input[k] = new
    for key, ref in fdef.ret.items():
        if ref == old:
            fdef.ret[key] = new


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
