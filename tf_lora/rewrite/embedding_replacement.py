"""replace-embedding: embedding gathers on chosen variables become pulls from a tf_lora.SparseTable that holds
the variable's rows (id = row index), in a TF2 SavedModel (rewritten as protos) or a TF1 graph (in a session).

The table's SavedModel pieces (its resource node, creator/initializer/destroyer functions and checkpoint
save/restore functions) come from a donor: a one-table tf.Module that TensorFlow itself saves, transplanted
with fresh node ids and function names. The rows go into the checkpoint, and TensorFlow re-saves the result.
"""

import dataclasses
import re
import uuid

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import node_def_pb2, types_pb2

from tf_lora.python.ops import sparse_table_ops
from tf_lora.rewrite.errors import RewriteError
from tf_lora.rewrite.graph_defs import SPARSE_TABLE_PULL, identifier, rename_output, split_ref
from tf_lora.rewrite.graph_edit import (
    ArgumentAdder,
    checkpoint_graph,
    donor,
    name_matches,
    resave,
    transplant,
    unique_child,
)
from tf_lora.rewrite.model_files import OBJECT_GRAPH_KEY, ModelFiles
from tf_lora.rewrite.saved_model_writer import write_saved_model
from tf_lora.rewrite.tf1_session import all_variables, rewire, session_model, variable_of, write_session
from tf_lora.sparse.table import SparseTable

v1 = tf.compat.v1


@dataclasses.dataclass
class Replaced:
    variable: str
    shape: tuple
    table: str  # the root attribute that holds the table
    lookups: list  # "function/node (op)" of each gather replaced


def replace_embedding(model_dir, out_dir, target, overwrite=False, progress=None) -> list:
    """Writes a copy of the SavedModel `model_dir` in which every embedding gather (GatherV2 on axis 0, or
    ResourceGather, without batch dims) of a float32 `[rows, dim]` variable whose name (or layer) fully
    matches `target` reads from a new SparseTable holding the variable's rows, ids = row indices. The outputs
    are unchanged for ids in [0, rows); an id outside reads as a zero row where the gather would fail.

    Raises:
      RewriteError: no lookup matches, a variable that is not float32 [rows, dim], or a model this cannot
        extend; nothing written.
    """
    say = progress or (lambda _msg: None)
    pattern = re.compile(target)
    files = ModelFiles(model_dir)
    if files.tf1:
        result, found = _replace_embedding_tf1(
            files, out_dir, lambda name: name_matches(pattern, name), overwrite, say
        )
        if result is None:
            raise RewriteError(
                f"replace-embedding: no embedding lookup matches {target!r} (lookups on: {found})"
            )
        return result
    sites, found, problems = {}, [], []
    for fdef in files.model_functions():
        for node in fdef.node_def:
            site = _lookup(files, fdef, node)
            if site is None:
                continue
            variable, ids_ref = site
            found.append(variable.name)
            if not name_matches(pattern, variable.name):
                continue
            if variable.dtype != "float32" or len(variable.shape) != 2:
                problems.append(
                    f"{variable.name}: a {variable.dtype} {list(variable.shape)} variable; "
                    "tables hold float32 [rows, dim]"
                )
                continue
            sites.setdefault(variable.node_id, []).append((fdef.signature.name, node.name, ids_ref))
    if problems:
        raise RewriteError("replace-embedding: nothing written; " + "; ".join(problems))
    if not sites:
        raise RewriteError(
            f"replace-embedding: no embedding lookup matches {target!r} (lookups on: {sorted(set(found))})"
        )

    proto, meta = files.copy_proto()
    functions = {f.signature.name: f for f in meta.graph_def.library.function}
    ckpt = checkpoint_graph(files)
    args = ArgumentAdder(files, meta, functions)
    new_values, replaced = {}, []
    for variable_id, lookups in sorted(sites.items(), key=lambda item: str(item[0])):
        variable = files.variables[variable_id]
        rows, dim = variable.shape
        local = unique_child(meta.object_graph_def, f"tf_lora_table_{identifier(variable.name)}")
        say(f"table for {variable.name}")
        module = tf.Module()
        module.table = SparseTable(dim, name=f"replaced_{uuid.uuid4().hex[:12]}")  # a table of its own
        ids, keys = transplant(meta, ckpt, donor(module), {"table": local})
        table_id, keys = ids["table"], keys[ids["table"]]
        contents = {
            "keys": np.arange(rows, dtype=np.int64),
            "values": files.value(variable).astype(np.float32),
            "slots": np.zeros((rows, 0), np.float32),  # SGD: no optimizer slots
            "update_counts": np.zeros(rows, np.int64),
            "last_steps": np.zeros(rows, np.int64),
            "step": np.array(0, np.int64),
        }
        for name, value in contents.items():
            new_values[keys[name]] = value
        for fn, node_name, ids_ref in lookups:
            say(f"replace {fn}/{node_name}")
            _replace_with_pull(functions[fn], node_name, ids_ref, args.ensure(fn, table_id), dim)
        replaced.append(Replaced(variable.name, (rows, dim), local, [f"{f}/{n}" for f, n, _ in lookups]))
    new_values[OBJECT_GRAPH_KEY] = np.array(ckpt.SerializeToString(), dtype=object)
    say(f"write {out_dir}")
    write_saved_model(files, proto, new_values, out_dir, overwrite=overwrite, finish=resave)
    return replaced


def _lookup(files, fdef, node):
    """(variable, ids reference) when node is an embedding gather of a saved variable, else None."""
    if node.op == "ResourceGather" and node.attr["batch_dims"].i == 0:
        resource = split_ref(node.input[0])[0]
        variable = files.arg_variables.get((fdef.signature.name, resource))
        return (variable, node.input[1]) if variable is not None else None
    if node.op == "GatherV2" and node.attr["batch_dims"].i == 0:
        variable = files.read_variable(fdef, node.input[0])
        if variable is None:
            return None
        try:
            axis = int(files.evaluate(fdef, node.input[2]))
        except RewriteError:
            return None
        return (variable, node.input[1]) if axis == 0 else None
    return None


def _replace_with_pull(fdef, node_name, ids_ref, table_arg, dim):
    """The gather node becomes SparseTablePull(table, int64 ids) under the same name; its consumers are
    rewired by the rename of its output (`output` -> `values`)."""
    node = next(n for n in fdef.node_def if n.name == node_name)
    index_type = node.attr["Tindices"].type
    cast = node_def_pb2.NodeDef(name=f"{node_name}/tf_lora_ids", op="Cast", input=[ids_ref])
    cast.attr["SrcT"].type = index_type
    cast.attr["DstT"].type = types_pb2.DT_INT64
    cast.attr["Truncate"].b = False
    fdef.node_def.append(cast)
    control = [i for i in node.input if i.startswith("^")]
    node.op = SPARSE_TABLE_PULL
    del node.input[:]
    node.input.extend([table_arg, f"{cast.name}:y:0", *control])
    for key in list(node.attr):
        if not key.startswith("_"):
            del node.attr[key]
    node.attr["dim"].i = dim
    node.attr["training"].b = False
    rename_output(fdef, node_name, "output", "values")


def _replace_embedding_tf1(files, out_dir, matches, overwrite, say):
    """replace-embedding on a TF1 graph, in a session (tf1_session)."""
    replaced, found, problems = [], [], []
    with session_model(files) as (graph, session, signatures):
        sites = {}
        for op in graph.get_operations():
            if op.type not in ("GatherV2", "ResourceGather") or op.get_attr("batch_dims") != 0:
                continue
            if op.type == "GatherV2" and session.run(op.inputs[2]) != 0:
                continue
            variable = variable_of(op.inputs[0])
            if variable is None:
                continue
            found.append(variable.name)
            if matches(variable.name):
                sites.setdefault(variable.name, []).append(op)
        if not sites:
            return None, sorted(set(found))
        tables = []
        for name, gathers in sorted(sites.items()):
            value = session.run(_read_gathered(graph, gathers[0]))
            if value.dtype != np.float32 or value.ndim != 2:
                problems.append(
                    f"{name}: a {value.dtype} {list(value.shape)} variable; tables hold float32 [rows, dim]"
                )
                continue
            rows, dim = value.shape
            with graph.as_default():
                table = SparseTable(dim, name=f"tf_lora_table_{name.replace('/', '_')}")
                for gather in gathers:
                    say(f"replace {gather.name}")
                    ids = tf.cast(gather.inputs[1], tf.int64)
                    pull = sparse_table_ops.pull(table.resource_handle, ids, dim=dim, training=False)
                    rewire(gather.outputs[0], pull, signatures)
                load = table.import_(
                    {
                        "keys": np.arange(rows, dtype=np.int64),
                        "values": value,
                        "slots": np.zeros((rows, 0), np.float32),
                        "update_counts": np.zeros(rows, np.int64),
                        "last_steps": np.zeros(rows, np.int64),
                        "step": np.array(0, np.int64),
                    }
                )
            session.run(load)
            tables.append(table)
            replaced.append(
                Replaced(name, (rows, dim), table.resource_handle.op.name, [g.name for g in gathers])
            )
        if problems:
            raise RewriteError("replace-embedding: nothing written; " + "; ".join(problems))
        say(f"write {out_dir}")
        write_session(files, session, signatures, out_dir, overwrite, [*all_variables(graph), *tables])
    return replaced, None


def _read_gathered(graph, gather):
    """A tensor holding the gathered variable's value."""
    source = gather.inputs[0]
    if source.dtype == tf.resource:
        with graph.as_default():
            return v1.raw_ops.ReadVariableOp(resource=source, dtype=gather.get_attr("dtype"))
    return source
