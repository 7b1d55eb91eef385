"""inject and replace-embedding on TF1 graphs (SavedModels from simple_save / Builder, MetaGraphDef files with
checkpoints): the graph is loaded into a session, new ops are wired in front of the old consumers, and the
result is written by TensorFlow's own Saver and SavedModelBuilder, with the signatures following the
tensors they named."""

import contextlib
import os
import shutil

import numpy as np
import tensorflow as tf

from tf_lora.python.ops import lora_ops, sparse_table_ops
from tf_lora.rewrite.saved_model import VARIABLE_OPS, RewriteError, install_output, prepare_output
from tf_lora.sparse.table import SparseTable

v1 = tf.compat.v1


@contextlib.contextmanager
def session_model(files):
    """(graph, session, {name: SignatureDef}) of a TF1 model, variables restored."""
    if files.kind == "graph_def":
        raise RewriteError(
            f"{files.path}: a bare GraphDef has no variable collections or saver to rebuild the model from; "
            "this command needs a MetaGraphDef (.meta) or a SavedModel"
        )
    graph = tf.Graph()
    with graph.as_default(), v1.Session(graph=graph) as session:
        meta = load_into(files, session)
        signatures = {}
        for name, sig in meta.signature_def.items():
            copy = type(sig)()
            copy.CopyFrom(sig)
            signatures[name] = copy
        yield graph, session, signatures


def load_into(files, session):
    """Loads a TF1 SavedModel or MetaGraphDef (variables restored) into `session`, whose graph is the
    default; returns the MetaGraphDef that holds its signatures."""
    try:
        if files.kind == "saved_model_v1":
            return v1.saved_model.loader.load(session, list(files.meta.meta_info_def.tags), files.path)
        v1.train.import_meta_graph(files.path).restore(session, files.prefix)
        return files.meta
    except (OSError, ValueError, tf.errors.OpError) as e:
        raise RewriteError(f"{files.path}: cannot be loaded ({e})") from None


def variable_of(tensor):
    """The variable op a tensor reads (through Identity and ReadVariableOp), or None."""
    op = tensor.op
    while op.type in ("Identity", "ReadVariableOp"):
        op = op.inputs[0].op
    return op if op.type in VARIABLE_OPS else None


def rewire(old, new, signatures, keep=()):
    """Every consumer of tensor `old` (but the ops in `keep`) and every signature output naming it reads
    `new` instead."""
    for op in list(old.consumers()):
        if op in keep:
            continue
        for index, tensor in enumerate(op.inputs):
            if tensor is old:
                op._update_input(index, new)  # noqa: SLF001 - TensorFlow's own graph editing uses it
    for sig in signatures.values():
        for info in sig.outputs.values():
            if info.name == old.name:
                info.name = new.name


def write(files, session, signatures, out, overwrite, var_list):
    """Writes the session's graph and values like the input: a SavedModel through SavedModelBuilder, or
    `<name>.meta` + checkpoint through a Saver (signatures kept in the MetaGraphDef); staged, then renamed."""
    out, staging = prepare_output(files, out, overwrite)
    try:
        saver = v1.train.Saver(var_list=var_list)
        if files.kind == "saved_model_v1":
            builder = v1.saved_model.Builder(staging)
            builder.add_meta_graph_and_variables(
                session, list(files.meta.meta_info_def.tags), signature_def_map=signatures, saver=saver
            )
            builder.save()
        else:
            os.makedirs(staging)
            base = os.path.basename(files.prefix)
            saver.save(session, os.path.join(staging, base), write_meta_graph=False)
            meta = saver.export_meta_graph()
            for name, sig in signatures.items():
                meta.signature_def[name].CopyFrom(sig)
            with open(os.path.join(staging, base + ".meta"), "wb") as f:
                f.write(meta.SerializeToString())
        install_output(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _all_variables(graph):
    return graph.get_collection(v1.GraphKeys.GLOBAL_VARIABLES)


def inject_tf1(files, out_dir, matches, rank, alpha, seed, overwrite, say):
    """inject on a TF1 graph (see tf_lora.rewrite.inject)."""
    from tf_lora.rewrite.inject import Injected  # noqa: PLC0415 - inject imports this module

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
        write(files, session, signatures, out_dir, overwrite, _all_variables(graph))
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


def replace_embedding_tf1(files, out_dir, matches, overwrite, say):
    """replace-embedding on a TF1 graph (see tf_lora.rewrite.replace_embedding)."""
    from tf_lora.rewrite.embedding import Replaced  # noqa: PLC0415 - embedding imports this module

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
            value = session.run(_read(graph, gathers[0]))
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
        write(files, session, signatures, out_dir, overwrite, [*_all_variables(graph), *tables])
    return replaced, None


def _read(graph, gather):
    """A tensor holding the gathered variable's value."""
    source = gather.inputs[0]
    if source.dtype == tf.resource:
        with graph.as_default():
            return v1.raw_ops.ReadVariableOp(resource=source, dtype=gather.get_attr("dtype"))
    return source
