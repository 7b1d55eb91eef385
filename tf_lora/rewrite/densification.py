"""densify: a TF2 SavedModel whose functions look rows up in tf_lora SparseTables becomes one that stock
TensorFlow (TF Serving, a process that never imports tf_lora) runs with the same outputs.

Each table becomes stock TensorFlow objects holding its contents: `keys` (int64 `[n]`, its ids sorted),
`values` (float32 `[n + 1, dim]`: their rows, then a zero row) and `index`, a TensorFlow hash table from
`keys[i]` to `i` that TensorFlow fills from `keys` when the model loads. Each inference pull becomes a
lookup of the ids in the index (default `n`) and a gather of those rows: an id the table does not hold reads
the zero row, which is what the pull reads for it. The index's pieces come from a donor that TensorFlow
itself saves (graph_edit.transplant); the table's resource leaves the object graph, the functions that
pulled from it binding the index in its place, and TensorFlow re-saves the result, writing only what is
still reached: no tf_lora op remains.
"""

import dataclasses
import re
import shutil

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import node_def_pb2, types_pb2
from tensorflow.python.framework import tensor_util
from tensorflow.python.ops import gen_lookup_ops, lookup_ops

from tf_lora.rewrite.errors import RewriteError
from tf_lora.rewrite.graph_defs import (
    PLUGIN_PREFIX,
    SPARSE_TABLE_PULL,
    called,
    identifier,
    rename_node,
    split_ref,
    stripped_op_names,
    with_callees,
)
from tf_lora.rewrite.graph_edit import (
    ArgumentAdder,
    add_variable,
    checkpoint_graph,
    donor,
    list_variable,
    reached,
    resave,
    transplant,
    unique_child,
)
from tf_lora.rewrite.model_files import OBJECT_GRAPH_KEY, ModelFiles
from tf_lora.rewrite.saved_model_writer import write_saved_model
from tf_lora.rewrite.variables import resource_arguments

_CONTROL_FLOW = ("While", "StatelessWhile", "Case", "StatelessCase")  # an If's branches are looked into
CREATE = "TfLora>SparseTable"


@dataclasses.dataclass
class Densified:
    table: str  # the table's path in the object graph, e.g. "_misc_assets/0" (a Keras export) or "table"
    name: str  # the table's name (tf_lora.SparseTable's `name`; a SparseEmbedding's layer name)
    dim: int
    ids: int  # ids written
    left_out: int  # ids below min_update_count, which now read as zero rows
    keys: str | None  # the new variables' names (no keys variable for a table left with no ids)
    values: str
    lookups: list  # "function/node" of each lookup that replaced a pull


@dataclasses.dataclass
class DensifyReport:
    tables: list  # [Densified]
    probe_ids: np.ndarray  # ids on which both models must read alike (--verify draws its inputs from them)


@dataclasses.dataclass
class Table:
    node_id: int
    path: str
    name: str
    dim: int
    checkpoint_keys: dict  # of each saved attribute ("keys", "values", "update_counts", ...)
    own: set  # the functions it holds (creator, initializer, destroyer, save, restore) and those they call


def densify(model_dir, out_dir, table=None, min_update_count=0, overwrite=False, progress=None):
    """Writes a copy of the TF2 SavedModel `model_dir` in which every tf_lora SparseTable (those whose name
    or object-graph path fully matches `table`, when given) is replaced by stock TensorFlow objects holding
    its contents, and every pull from it by core TensorFlow ops reading them: same outputs, no tf_lora op,
    so stock TensorFlow and TF Serving load and run it. An id the table does not hold reads a zero row, as
    an inference pull reads it. Ids pushed fewer than `min_update_count` times are left out (they read as
    zero rows, as after `table.evict(min_update_count)`). The densified tables' SparseEmbedding
    `pulled_rows` (training's zeros) stay out of the output.

    Returns:
      DensifyReport: one Densified per table, and ids to check the rewrite on.

    Raises:
      RewriteError: a TF1 graph, no table (or none matching), a table that a function uses other than by an
        inference pull (a push, a training pull: a training graph, not a serving one; a pull under control
        flow), or a table whose contents the checkpoint lacks; nothing written.
    """
    say = progress or (lambda _msg: None)
    if isinstance(min_update_count, bool) or not isinstance(min_update_count, (int, np.integer)):
        raise RewriteError(f"densify: min_update_count must be an integer, got {min_update_count!r}")
    if min_update_count < 0:
        raise RewriteError(f"densify: min_update_count must be >= 0, got {min_update_count}")
    files = ModelFiles(model_dir)
    if files.tf1:
        uses = any(n.op.startswith(PLUGIN_PREFIX) for f in files.model_functions() for n in f.node_def)
        raise RewriteError(
            f"densify: {model_dir} is a TF1 graph; densify reads TF2 SavedModels"
            + (
                " (densify needs the tables as saved objects: tf_lora.SparseTable in a tf.Module or Keras "
                "model saved by tf.saved_model.save or model.export)"
                if uses
                else " (and it holds no table)"
            )
        )
    tables = every = sparse_tables(files)
    if not tables:
        pulls = any(n.op == SPARSE_TABLE_PULL for f in files.model_functions() for n in f.node_def)
        raise RewriteError(
            f"densify: {model_dir} holds no tf_lora SparseTable"
            + (
                " object, though its functions pull from tables (a TF1 graph saved as a TF2 SavedModel?): "
                "densify needs the tables as saved objects (tf_lora.SparseTable in a tf.Module or Keras "
                "model saved by tf.saved_model.save or model.export)"
                if pulls
                else ""
            )
        )
    if table is not None:
        pattern = re.compile(table)
        chosen = {i: t for i, t in tables.items() if any(pattern.fullmatch(n) for n in _names(t))}
        if not chosen:
            listed = ", ".join(f"{t.name} ({t.path})" for t in tables.values())
            raise RewriteError(f"densify: no table matches {table!r} (tables: {listed})")
        tables = chosen
    sites, others = table_uses(files, tables)
    if others:
        uses = "; ".join(f"{use} on table {tables[i].name}" for i, found in others.items() for use in found)
        raise RewriteError(
            f"densify: nothing written; the model does more than look rows up in its tables: {uses}. densify "
            "writes a serving model: save one whose functions only pull without training, outside "
            "loops (Keras: model.export; a tf.Module: save the serving functions alone)"
        )
    contents = {i: _contents(files, t, min_update_count) for i, t in tables.items()}

    proto, meta = files.copy_proto()
    functions = {f.signature.name: f for f in meta.graph_def.library.function}
    objects, ckpt = meta.object_graph_def, checkpoint_graph(files)
    args = ArgumentAdder(files, meta, functions)
    index_donor = donor(_IdIndex())
    new_values, report = {}, []
    for table_id, found in sorted(tables.items()):
        say(f"table {found.name}")
        keys, rows, left_out, _ = contents[table_id]
        stem = f"tf_lora_densified_{identifier(found.name)}"
        scope = f"densified/{identifier(found.name)}"  # a valid variable name whatever the table's name
        index_id = keys_name = None
        if len(keys):  # TensorFlow's hash tables refuse to be filled with nothing; no index reads zeros
            names = {
                "keys": unique_child(objects, f"{stem}_keys"),
                "index": unique_child(objects, f"{stem}_index"),
            }
            ids, checkpoint_keys = transplant(meta, ckpt, index_donor, names)
            keys_name, index_id = f"{scope}/keys", ids["index"]
            objects.nodes[ids["keys"]].variable.name = keys_name
            list_variable(objects, ckpt, ids["keys"], trainable=False)
            (keys_key,) = checkpoint_keys[ids["keys"]].values()
            new_values[keys_key] = keys
        values_local = unique_child(objects, f"{stem}_values")
        values_key = f"{values_local}/.ATTRIBUTES/VARIABLE_VALUE"
        new_values[values_key] = np.concatenate(
            [rows.astype(np.float32), np.zeros((1, found.dim), np.float32)]
        )
        values_id = add_variable(
            objects,
            ckpt,
            values_local,
            f"{scope}/values",
            new_values[values_key],
            values_key,
            trainable=False,
        )
        # The functions that took the table's handle take the index's in its place (or the values', unread).
        instead = values_id if index_id is None else index_id
        for name, concrete in objects.concrete_functions.items():
            if name not in found.own:
                concrete.bound_inputs[:] = [instead if i == table_id else i for i in concrete.bound_inputs]
        _detach(objects, ckpt, table_id)
        new_values.update((key, None) for key in found.checkpoint_keys.values())
        lookups, replaced = sites.get(table_id, []), []
        for fn, node_name in lookups:
            say(f"replace {fn}/{node_name}")
            new_name = _replace_pull(
                functions[fn], node_name, args.ensure(fn, values_id), len(keys), found.dim
            )
            replaced.append(f"{fn}/{new_name}")
        report.append(
            Densified(
                found.path,
                found.name,
                found.dim,
                len(keys),
                left_out,
                keys_name,
                f"{scope}/values",
                replaced,
            )
        )
    for node_id in _unused_pulled_rows(
        objects, tables.values(), set().union(*(t.own for t in every.values()))
    ):
        _detach(objects, ckpt, node_id)
        new_values.update((a.checkpoint_key, None) for a in files.checkpoint_graph.nodes[node_id].attributes)
    new_values[OBJECT_GRAPH_KEY] = np.array(ckpt.SerializeToString(), dtype=object)
    every_table = len(tables) == len(every)
    say(f"write {out_dir}")
    write_saved_model(
        files, proto, new_values, out_dir, overwrite=overwrite, finish=lambda d: _resave(d, every_table)
    )
    return DensifyReport(report, _probe_ids(files, tables, contents))


def _names(table):
    """What `table=` matches: the table's name, its object path, and for a shard of a ShardedSparseTable
    (`<name>_shard_<k>`) the sharded table's name."""
    return [table.name, table.path, re.sub(r"_shard_\d+$", "", table.name)]


def sparse_tables(files):
    """{object graph node id: Table} of the model's tf_lora SparseTables."""
    objects = files.meta.object_graph_def
    paths = _paths(objects)
    found = {}
    for node_id, node in enumerate(objects.nodes):
        if node.WhichOneof("kind") != "resource":
            continue
        creator = None
        for child in node.children:
            if child.local_name != "_create_resource":
                continue
            for fn in objects.nodes[child.node_id].function.concrete_functions:
                creator = _creating_node(files.functions, fn) or creator
        if creator is None:
            continue
        shared = creator.attr["shared_name"].s.decode()
        # SparseTable names its resource tf_lora_<name>_<k>; TensorFlow's loader appends _load (and more).
        name = re.sub(r"^tf_lora_(.*?)_\d+(?:_load(?:_\d+)?)*$", r"\1", shared) or shared
        checkpoint_keys = {}
        if files.checkpoint_graph is not None and node_id < len(files.checkpoint_graph.nodes):
            checkpoint_keys = {
                a.name: a.checkpoint_key for a in files.checkpoint_graph.nodes[node_id].attributes
            }
        found[node_id] = Table(
            node_id,
            paths.get(node_id, f"<node {node_id}>"),
            name,
            creator.attr["dim"].i,
            checkpoint_keys,
            # Its own functions (save, restore, which may branch) use it as no model does.
            with_callees(files.functions, reached(objects, [node_id])[1]),
        )
    return found


def _creating_node(functions, name, seen=()):
    """The SparseTable node of a creator function, or of a function it calls (a re-saved model's creator
    calls the original one), or None."""
    for node in functions[name].node_def if name in functions and name not in seen else ():
        if node.op == CREATE:
            return node
        for callee, _ in called(node):
            found = _creating_node(functions, callee, (*seen, name))
            if found is not None:
                return found
    return None


def _paths(objects):
    """{node id: the first path to it from the root, as "a/b"} (breadth first)."""
    paths, queue = {0: ""}, [0]
    for node_id in queue:
        for child in objects.nodes[node_id].children:
            if child.node_id not in paths:
                paths[child.node_id] = f"{paths[node_id]}/{child.local_name}".lstrip("/")
                queue.append(child.node_id)
    return paths


def table_uses(files, tables):
    """({table node id: [(function, pull node)]}, {table node id: ["function/node: how"]}): every inference
    pull from the tables, and every other use of them (a push, a training pull, a control-flow op taking the
    handle, any other op; passing the handle on to a called function, or through Identity, is looked
    through, unless that function's argument takes another table from elsewhere)."""
    own = set().union(*(t.own for t in tables.values()))
    table_args = resource_arguments(files.meta, files.functions, tables)
    sites, others = {}, {}
    for fdef in files.model_functions():
        fn = fdef.signature.name
        if fn in own:
            continue
        handles = {arg: t for (f, arg), t in table_args.items() if f == fn}
        for node in fdef.node_def:  # Identity of a handle is the handle
            if node.op == "Identity" and split_ref(node.input[0])[0] in handles:
                handles[node.name] = handles[split_ref(node.input[0])[0]]
        for node in fdef.node_def:
            data = [ref for ref in node.input if not ref.startswith("^")]
            for position, ref in enumerate(data):
                found = handles.get(split_ref(ref)[0])
                if found is None or node.op == "Identity":
                    continue
                if called(node):
                    for callee, first in called(node):
                        args = (
                            files.functions[callee].signature.input_arg if callee in files.functions else []
                        )
                        at = position - first
                        other = table_args.get((callee, args[at].name)) if 0 <= at < len(args) else None
                        if other is not None and other.node_id != found.node_id:
                            others.setdefault(found.node_id, []).append(
                                f"{fn}/{node.name}: passed to {callee}, which also takes table "
                                f"{other.name} there"
                            )
                    continue
                if node.op == SPARSE_TABLE_PULL and position == 0 and not node.attr["training"].b:
                    sites.setdefault(found.node_id, []).append((fn, node.name))
                else:
                    how = (
                        "a training pull (it inserts ids)"
                        if node.op == SPARSE_TABLE_PULL
                        else f"{node.op} (a pull inside a loop is not densified)"
                        if node.op in _CONTROL_FLOW
                        else node.op
                    )
                    others.setdefault(found.node_id, []).append(f"{fn}/{node.name}: {how}")
    return sites, others


def _contents(files, table, min_update_count):
    """(ids sorted, their rows, how many were left out) from the checkpoint."""
    missing = {"keys", "values", "update_counts"} - set(table.checkpoint_keys)
    if files.reader is None or missing:
        raise RewriteError(f"densify: the checkpoint holds no contents for table {table.name} ({table.path})")
    try:
        keys, values, counts = (
            files.reader.get_tensor(table.checkpoint_keys[k]) for k in ("keys", "values", "update_counts")
        )
    except (tf.errors.OpError, IndexError, ValueError) as e:  # a truncated data file: IndexError
        raise RewriteError(
            f"{files.prefix}: unreadable checkpoint, reading table {table.name} ({e})"
        ) from None
    if values.shape != (len(keys), table.dim) or counts.shape != keys.shape:
        raise RewriteError(
            f"densify: table {table.name}: the checkpoint's contents do not fit together (keys "
            f"{list(keys.shape)}, values {list(values.shape)}, counts {list(counts.shape)}, dim {table.dim})"
        )
    kept = counts >= min_update_count
    order = np.argsort(keys[kept], kind="stable")
    return keys[kept][order], values[kept][order], int(np.count_nonzero(~kept)), keys[~kept]


def _probe_ids(files, tables, contents):
    """Ids on which the densified model must read what the original reads, whichever table's input they
    reach: some each table kept, and ids no table held; never an id some table left out (min_update_count),
    which that table now reads as zeros."""
    rng = np.random.default_rng(0)
    kept = [contents[i][0] for i in tables]
    left_out = np.concatenate([np.zeros(0, np.int64)] + [contents[i][3] for i in tables])
    held = np.concatenate([np.zeros(0, np.int64), *kept, left_out])
    picked = [rng.choice(k, min(len(k), 48), replace=False) for k in kept if len(k)]
    picked.append(np.setdiff1d([-1, 0, 1, np.iinfo(np.int64).max, np.iinfo(np.int64).min], held))
    return np.setdiff1d(np.concatenate(picked), left_out).astype(np.int64)


def _detach(objects, ckpt, node_id):
    """The object is no longer anyone's child or dependency; its node stays (nodes are numbered), unreached,
    so that TensorFlow's re-save leaves it out. Its checkpoint attributes go: nothing restores it. Lists (a
    Keras export's `variables`, `_misc_assets`) are numbered again, as a list's items are, by the object
    graph's numbering (a list's checkpoint view may leave items out) in both graphs."""
    for k, node in enumerate(objects.nodes):
        if not any(c.node_id == node_id for c in [*node.children, *node.dependencies]):
            continue
        renamed = {}
        if node.user_object.identifier == "trackable_list_wrapper":
            kept = [c.local_name for c in node.children if c.node_id != node_id]
            renamed = {old: str(position) for position, old in enumerate(kept)}
        graphs = [(objects.nodes[k].children, objects.nodes[k].dependencies)]
        if k < len(ckpt.nodes):
            graphs.append((ckpt.nodes[k].children,))
        for references in (r for group in graphs for r in group):
            kept = [
                (c.node_id, renamed.get(c.local_name, c.local_name))
                for c in references
                if c.node_id != node_id
            ]
            del references[:]
            for child, local_name in kept:
                references.add(node_id=child, local_name=local_name)
    del ckpt.nodes[node_id].attributes[:]


def _unused_pulled_rows(objects, tables, own):
    """The node ids of the densified tables' SparseEmbedding `pulled_rows` variables (`<table>/pulled_rows`,
    always zero, `max_ids_per_step * dim` floats, there for training) that no function of the model reads: a
    serving model does without them."""
    names = {f"{name}/pulled_rows" for t in tables for name in (t.name, re.sub(r"_shard_\d+$", "", t.name))}
    bound = {i for name, c in objects.concrete_functions.items() if name not in own for i in c.bound_inputs}
    return [
        k
        for k, node in enumerate(objects.nodes)
        if node.HasField("variable") and node.variable.name in names and k not in bound
    ]


def _replace_pull(fdef, node_name, values_arg, n, dim):
    """The pull node becomes, under the same name, core ops over the index (through the handle the pull
    took, now the index's; an empty table has no index, and every id reads row 0) and the values variable:

        rows = index.lookup(Reshape(ids, [-1]), default n)  # row n is the zero row
        values = Reshape(ResourceGather(values, rows), Shape(ids) + [dim])
    """
    pull = next(node for node in fdef.node_def if node.name == node_name)
    index_handle, ids = pull.input[0], pull.input[1]
    control = [ref for ref in pull.input if ref.startswith("^")]
    # Named as a lookup, not as the pull (a search of the graph for tf_lora finds nothing).
    name = node_name.replace(SPARSE_TABLE_PULL, "densified_lookup")
    name = name if name != node_name else f"{node_name}_densified"
    prefix = f"{name}/parts"
    new = []

    def node(name, op, inputs, out="output", **attrs):
        made = node_def_pb2.NodeDef(name=f"{prefix}/{name}", op=op, input=inputs)
        for key, value in attrs.items():
            if isinstance(value, tf.DType):
                made.attr[key].type = value.as_datatype_enum
            elif isinstance(value, bool):
                made.attr[key].b = value
            else:
                made.attr[key].i = value
        new.append(made)
        return f"{made.name}:{out}:0"

    def const(name, value):
        made = node(name, "Const", [], dtype=tf.as_dtype(value.dtype))
        new[-1].attr["value"].tensor.CopyFrom(tensor_util.make_tensor_proto(value))
        return made

    i64, i32 = tf.int64, tf.int32
    flat = node("flat", "Reshape", [ids, const("flat_shape", np.array([-1], np.int32))], T=i64, Tshape=i32)
    default = const("absent", np.array(n, np.int64))  # the zero row
    if n:
        index = node(
            "index", "LookupTableFindV2", [index_handle, flat, default], out="values", Tin=i64, Tout=i64
        )
    else:  # an empty table: every id reads the zero row, and there is no index
        index = node("index", "ZerosLike", [flat], out="y", T=i64)
    gathered = node(
        "gather",
        "ResourceGather",
        [values_arg, index],
        dtype=tf.float32,
        Tindices=i64,
        validate_indices=True,
        batch_dims=0,
    )
    ids_shape = node("ids_shape", "Shape", [ids], T=i64, out_type=i32)
    dims = [ids_shape, const("dim", np.array([dim], np.int32)), const("axis", np.array(0, np.int32))]
    shape = node("shape", "ConcatV2", dims, T=i32, Tidx=i32, N=2)
    pull.Clear()
    pull.name, pull.op = name, "Reshape"
    pull.input.extend([gathered, shape, *control])
    pull.attr["T"].type = types_pb2.DT_FLOAT
    pull.attr["Tshape"].type = types_pb2.DT_INT32
    fdef.node_def.extend(new)
    rename_node(fdef, node_name, name, {"values": "output"})
    return name


class _IdIndex(tf.Module):
    """The donor of a densified table's index: `keys` (int64, any length) and `index`, a stock TensorFlow
    hash table of keys[i] -> i, filled from `keys` when the model loads (TensorFlow's loaders, and TF
    Serving's, restore variables before they run table initializers)."""

    def __init__(self):
        super().__init__()
        self.keys = tf.Variable([0], dtype=tf.int64, shape=tf.TensorShape([None]), trainable=False)
        self.index = tf.lookup.StaticHashTable(_FromKeys(self.keys), default_value=-1)


class _FromKeys(lookup_ops.TableInitializerBase):
    def __init__(self, keys):
        self._keys = keys
        super().__init__(tf.int64, tf.int64)

    def initialize(self, table):
        keys = self._keys.read_value()
        rows = tf.range(tf.size(keys, out_type=tf.int64), dtype=tf.int64)
        return gen_lookup_ops.initialize_table_v2(table.resource_handle, keys, rows)


def _resave(staging, every_table):
    """TensorFlow re-saves the staged model (graph_edit.resave); with every table densified, no tf_lora op
    may remain in what it wrote."""
    out = resave(staging)
    try:
        if every_table:
            left = sorted(
                op for op in stripped_op_names(ModelFiles(out).meta) if op.startswith(PLUGIN_PREFIX)
            )
            if left:
                raise RewriteError(f"densify: the rewritten model still uses {left}; nothing written")
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out
