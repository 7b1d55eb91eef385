"""inspect: what a SavedModel holds for tf_lora: signatures, tf_lora ops and adapters, MatMuls, BatchMatMuls
and Einsum projections that could take an adapter, embedding lookups that a sparse table could replace."""

from tensorflow.python.framework import dtypes

from tf_lora.rewrite import densification
from tf_lora.rewrite.batch_matmuls import is_batch_projection, matrix_view
from tf_lora.rewrite.einsum_kernels import einsum_view, equation, is_projection
from tf_lora.rewrite.errors import RewriteError
from tf_lora.rewrite.folding import fold_one
from tf_lora.rewrite.graph_defs import PLUGIN_PREFIX, GraphBody, split_ref
from tf_lora.rewrite.lora_patterns import (
    BATCHED_LORA_APPLY,
    LORA_APPLY,
    projection_under,
    projection_weight,
    stack_names,
)
from tf_lora.rewrite.model_files import ModelFiles


def _tensor_info(info):
    shape = (
        None
        if info.tensor_shape.unknown_rank
        else [d.size if d.size >= 0 else None for d in info.tensor_shape.dim]
    )
    return {"dtype": dtypes.as_dtype(info.dtype).name if info.dtype else None, "shape": shape}


def _batched_entries(files, fdef, nodes, node, adapted):
    """One entry per adapter of a multi-adapter apply (`batch_index`: its id in adapter_ids)."""
    base = {"function": fdef.signature.name, "node": node.name}
    data = [i for i in node.input if not i.startswith("^")]
    projection = projection_under(nodes, data[0])
    weight = projection_weight(files, fdef, projection, through_cast=True) if projection is not None else None
    try:
        a_stack = files.evaluate(fdef, data[2])
        scales = files.evaluate(fdef, data[5]).reshape(-1)
    except RewriteError as e:
        return [{**base, "not_foldable": str(e)}]
    if weight is None:
        return [
            {
                **base,
                "not_foldable": f"{data[0]!r} is not (a bias added to) a MatMul, nor the rows of an Einsum "
                "or a BatchMatMul, of a saved variable",
            }
        ]
    adapted.add(projection.name)
    base.update(_on_einsum(projection))
    ranks = {}
    names = stack_names(files, fdef, nodes, data[2], len(a_stack), ranks)
    return [
        {
            **base,
            "weight": weight.name,
            "weight_shape": list(weight.shape),
            "adapter": name,
            "batch_index": k,
            "rank": int(ranks.get(k, a_stack.shape[2])),
            "scale": float(scales[k]),
        }
        for k, name in enumerate(names)
    ]


def _on_einsum(projection):
    """What an adapter entry adds when its apply sits on an Einsum projection (the equation) or a BatchMatMul
    (the op)."""
    if is_batch_projection(projection):
        return {"op": projection.op}
    return {"equation": equation(projection)} if projection.op != "MatMul" else {}


def _einsum_candidate(files, fdef, node):
    """An Einsum whose second operand is a saved variable, as a candidate for an adapter: its kernel's shape
    and `[in, out]` view (`matrix`), or why inject cannot adapt it (`not_injectable`); None for an Einsum of
    two activations (attention scores)."""
    kernel = files.read_variable(fdef, node.input[1])
    if kernel is None:
        return None
    fn = fdef.signature.name
    entry = {
        "function": fn,
        "node": node.name,
        "equation": equation(node),
        "weight": kernel.name,
        "shape": list(kernel.shape),
    }
    try:
        view = einsum_view(node, kernel.shape, f"{fn}/{node.name}")
    except RewriteError as e:
        return {**entry, "not_injectable": str(e)}
    return {**entry, "matrix": [view.in_features, view.out_features]}


def inspect(model_dir) -> dict:
    """A JSON-ready description of the SavedModel `model_dir`.

    Returns:
      {"path", "signatures": {name: {"inputs": {...}, "outputs": {...}}}, "tf_lora_ops": [...],
       "adapters": [...], "matmul_candidates": [...], "einsum_candidates": [...], "embedding_lookups": [...],
       "sparse_tables": [...]};
      each op entry names its function and node, variables by name with their shapes. An adapter on an
      Einsum projection has its `equation` (its weight_shape is the kernel's), one on a BatchMatMul its
      `op`; a BatchMatMul candidate (among the MatMul candidates) has its `op` and `matrix`, the `[in, out]`
      its weight is made (batch_matmuls); an Einsum candidate has its
      equation, the kernel's `shape` and `matrix`, the `[in, out]` an adapter sees (einsum_kernels), or
      `not_injectable` saying why there is none. A sparse table has its object-graph `table` path, `name`,
      `dim`, the `ids` its checkpoint holds, its inference `pulls` and `other_uses` (pushes, training pulls:
      what densify refuses).
    """
    files = ModelFiles(model_dir)
    signatures = {
        name: {
            "inputs": {k: _tensor_info(v) for k, v in sorted(sig.inputs.items())},
            "outputs": {k: _tensor_info(v) for k, v in sorted(sig.outputs.items())},
        }
        for name, sig in sorted(files.meta.signature_def.items())
        if not name.startswith("__")
    }
    plugin_ops, adapters, candidates, einsums, lookups = [], [], [], [], []
    for fdef in files.model_functions():
        fn = fdef.signature.name
        nodes = files.nodes(fdef)
        adapted = set()
        for node in fdef.node_def:
            if node.op.startswith(PLUGIN_PREFIX):
                plugin_ops.append({"function": fn, "node": node.name, "op": node.op})
            if node.op == LORA_APPLY:
                entry = {"function": fn, "node": node.name}
                try:
                    info, weight, projection, _ = fold_one(files, fdef, nodes, node, None)
                    adapted.add(projection.name)
                    entry.update(
                        weight=weight.name,
                        weight_shape=list(weight.shape),
                        adapter=info.adapter,
                        rank=info.rank,
                        scale=info.scale,
                        **_on_einsum(projection),
                    )
                except RewriteError as e:
                    entry["not_foldable"] = str(e)
                adapters.append(entry)
            elif node.op == BATCHED_LORA_APPLY:
                adapters += _batched_entries(files, fdef, nodes, node, adapted)
        for node in fdef.node_def:
            if node.op == "MatMul" and node.name not in adapted:
                weight = files.read_variable(fdef, node.input[1])
                if weight is not None:
                    candidates.append(
                        {
                            "function": fn,
                            "node": node.name,
                            "weight": weight.name,
                            "shape": list(weight.shape),
                        }
                    )
            elif is_batch_projection(node) and node.name not in adapted:
                found = matrix_view(files, fdef, node)
                if found is not None:
                    weight, view = found
                    candidates.append(
                        {
                            "function": fn,
                            "node": node.name,
                            "weight": weight.name,
                            "shape": list(weight.shape),
                            "op": node.op,
                            "matrix": [view.in_features, view.out_features],
                        }
                    )
            elif is_projection(node) and node.name not in adapted:
                entry = _einsum_candidate(files, fdef, node)
                if entry is not None:
                    einsums.append(entry)
            table = None
            if node.op == "ResourceGather":
                resource = split_ref(node.input[0])[0]
                # A TF1 graph's variable is its handle op; a TF2 function's, the argument bound to it.
                table = (
                    files.graph_variables.get(resource)
                    if isinstance(fdef, GraphBody)
                    else files.arg_variables.get((fn, resource))
                )
            elif node.op == "GatherV2":
                table = files.read_variable(fdef, node.input[0])
            if table is not None:
                lookups.append(
                    {
                        "function": fn,
                        "node": node.name,
                        "op": node.op,
                        "variable": table.name,
                        "shape": list(table.shape),
                    }
                )
    return {
        "path": files.path,
        "signatures": signatures,
        "tf_lora_ops": plugin_ops,
        "adapters": adapters,
        "matmul_candidates": candidates,
        "einsum_candidates": einsums,
        "embedding_lookups": lookups,
        "sparse_tables": _sparse_tables(files),
    }


def _sparse_tables(files):
    """The tf_lora SparseTables of a TF2 SavedModel: each one's path, name, dim, how many ids its checkpoint
    holds, its inference pulls and its other uses (which densify refuses)."""
    if files.tf1:
        return []
    tables = densification.sparse_tables(files)
    pulls, others = densification.table_uses(files, tables)
    shapes = files.reader.get_variable_to_shape_map() if files.reader is not None else {}
    return [
        {
            "table": table.path,
            "name": table.name,
            "dim": table.dim,
            "ids": shapes[keys][0] if (keys := table.checkpoint_keys.get("keys")) in shapes else None,
            "pulls": [f"{fn}/{node}" for fn, node in pulls.get(node_id, [])],
            "other_uses": others.get(node_id, []),
        }
        for node_id, table in sorted(tables.items())
    ]
