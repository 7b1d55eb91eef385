"""TF1 graphs in a session (SavedModels from simple_save / Builder, MetaGraphDef files with checkpoints): load
one with its variables restored, wire new ops in front of the old consumers, and write the result with
TensorFlow's own Saver and SavedModelBuilder, the signatures following the tensors they named. The rewrites
that add ops to TF1 graphs (inject, replace-embedding) are built on these."""

import contextlib
import os

import tensorflow as tf
from tensorflow.python.util import deprecation  # private: TensorFlow's own switch for its notices

from tf_lora.rewrite.errors import RewriteError
from tf_lora.rewrite.graph_defs import VARIABLE_OPS
from tf_lora.rewrite.output_dir import install_output, prepared_output

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
        # TF1's loader is deprecated, and says so on stderr at every load: not the user's concern here.
        with deprecation.silence():
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


def write_session(files, session, signatures, out, overwrite, var_list):
    """Writes the session's graph and values like the input: a SavedModel through SavedModelBuilder, or
    `<name>.meta` + checkpoint through a Saver (signatures kept in the MetaGraphDef); staged, then renamed."""
    with prepared_output(files, out, overwrite) as (out, staging):
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


def all_variables(graph):
    """The graph's global variables (what its Saver saves)."""
    return graph.get_collection(v1.GraphKeys.GLOBAL_VARIABLES)
