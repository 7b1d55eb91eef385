"""A TF2 SavedModel as protos and checkpoint values, with the questions graph rewrites ask of it.

The SavedModel's functions live in its graph's function library; variables reach them as resource arguments.
`SavedModelFiles` resolves which variable each resource argument is (from the object graph's bound inputs,
then through call ops into the functions they call), evaluates tensors that depend only on constants and
variables (adapter weights, scales), and writes a rewritten copy with new variable values.
"""

import contextlib
import dataclasses
import os
import shutil
import types

import numpy as np
import tensorflow as tf
from google.protobuf import text_format
from google.protobuf.message import DecodeError
from tensorflow.core.framework import graph_pb2, node_def_pb2
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2, trackable_object_graph_pb2
from tensorflow.python.framework import op_def_registry, tensor_util

PLUGIN_PREFIX = "TfLora>"
VARIABLE_OPS = ("VarHandleOp", "VariableV2", "Variable")
CALL_OPS = ("StatefulPartitionedCall", "PartitionedCall")
# Functions TensorFlow writes to save and restore the checkpoint: they touch every variable, never a model op.
SAVER_FUNCTIONS = ("__inference__traced_save_", "__inference__traced_restore_")
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"


class RewriteError(Exception):
    """A model that cannot be read, or a rewrite that cannot be done; `exit_code` for the command line (2: an
    unsupported pattern or bad input, named in the message)."""

    exit_code = 2


@dataclasses.dataclass
class Variable:
    node_id: object  # the object graph's node id (TF2), or the variable op's name (TF1 graphs)
    name: str  # the variable's own name, e.g. "dense/kernel"
    key: str  # its checkpoint key
    shape: tuple
    dtype: str


def split_ref(ref):
    """A FunctionDef input `node:out_arg:index` (or an argument name), or a GraphDef input `node:index` (or
    `node`), as (node, out_arg or None, index)."""
    parts = ref.split(":")
    if len(parts) == 1:
        return parts[0], None, 0
    if len(parts) == 2:
        return parts[0], None, int(parts[1])
    return parts[0], parts[1], int(parts[2])


class GraphBody:
    """The top-level graph of a TF1 model, read like a FunctionDef: `signature.name`, `node_def`, and `ret`
    (the tensors the signatures fetch, so that they count as consumers)."""

    def __init__(self, meta):
        self.signature = types.SimpleNamespace(name="graph")
        self.node_def = meta.graph_def.node
        self.ret = {
            f"{name}/{key}": info.name
            for name, sig in meta.signature_def.items()
            for key, info in sig.outputs.items()
            if info.name
        }


class SavedModelFiles:
    """The protos and checkpoint of a TF2 SavedModel directory (read once, never written to)."""

    def __init__(self, path):
        self.path = os.fspath(path)
        if os.path.isfile(self.path) and self.path.endswith(".meta"):
            self.kind = "meta_graph"
            self.proto = self._parse(meta_graph_pb2.MetaGraphDef(), self.path, "MetaGraphDef")
            self.meta = self.proto
            self.prefix = self.path[: -len(".meta")]
        elif os.path.isfile(self.path) and self.path.endswith((".pb", ".pbtxt")):
            # A bare GraphDef with its checkpoint beside it (model.pb + model.index): read as a MetaGraphDef
            # without saver or signatures; checkpoint keys are the variables' names, as a default Saver
            # writes them.
            self.kind = "graph_def"
            graph_def = graph_pb2.GraphDef()
            if self.path.endswith(".pbtxt"):
                try:
                    with open(self.path) as f:
                        text_format.Parse(f.read(), graph_def)
                except (text_format.ParseError, UnicodeDecodeError) as e:
                    raise RewriteError(f"{self.path}: corrupted GraphDef text ({e})") from None
            else:
                self._parse(graph_def, self.path, "GraphDef")
            self.proto = meta_graph_pb2.MetaGraphDef(graph_def=graph_def)
            self.meta = self.proto
            self.prefix = os.path.splitext(self.path)[0]
        else:
            pb = os.path.join(self.path, "saved_model.pb")
            if not os.path.isdir(self.path):
                raise RewriteError(f"{self.path}: no such directory (or .meta file)")
            if not os.path.isfile(pb):
                raise RewriteError(f"{self.path}: not a SavedModel directory (no saved_model.pb)")
            self.proto = self._parse(saved_model_pb2.SavedModel(), pb, "SavedModel")
            if not self.proto.meta_graphs:
                raise RewriteError(f"{pb}: holds no meta graph")
            serve = [m for m in self.proto.meta_graphs if "serve" in m.meta_info_def.tags]
            self.meta = (serve or list(self.proto.meta_graphs))[0]
            self.kind = "saved_model" if self.meta.object_graph_def.nodes else "saved_model_v1"
            self.prefix = os.path.join(self.path, "variables", "variables")
        self.functions = {f.signature.name: f for f in self.meta.graph_def.library.function}
        self._read_checkpoint()
        self.arg_variables = self._resolve_resource_arguments() if self.kind == "saved_model" else {}
        self.graph_variables = self._graph_variables() if self.kind != "saved_model" else {}

    @staticmethod
    def _parse(message, path, what):
        try:
            with open(path, "rb") as f:
                message.ParseFromString(f.read())
        except DecodeError as e:
            raise RewriteError(f"{path}: corrupted {what} proto ({e})") from None
        return message

    @property
    def tf1(self) -> bool:
        return self.kind != "saved_model"

    def copy_proto(self):
        """A copy of the proto to rewrite, and its meta graph (the one read)."""
        proto = type(self.proto)()
        proto.CopyFrom(self.proto)
        if self.kind in ("meta_graph", "graph_def"):
            return proto, proto
        index = list(self.proto.meta_graphs).index(self.meta)
        return proto, proto.meta_graphs[index]

    # -- variables ---------------------------------------------------------------------------------------

    def _read_checkpoint(self):
        self.variables = {}
        self.reader = self.checkpoint_graph = None
        if not os.path.exists(self.prefix + ".index"):
            if self.kind in ("meta_graph", "graph_def"):
                raise RewriteError(f"{self.path}: no checkpoint beside it ({self.prefix}.index)")
            return
        try:
            self.reader = tf.train.load_checkpoint(self.prefix)
            self.shapes = self.reader.get_variable_to_shape_map()
            self.dtypes = self.reader.get_variable_to_dtype_map()
            if self.kind != "saved_model":
                return
            graph = trackable_object_graph_pb2.TrackableObjectGraph()
            graph.ParseFromString(self.reader.get_tensor(OBJECT_GRAPH_KEY))
            self.checkpoint_graph = graph
        except (tf.errors.OpError, DecodeError, ValueError) as e:
            raise RewriteError(f"{self.prefix}: unreadable checkpoint ({e})") from None
        shapes, dtypes = self.shapes, self.dtypes
        for node_id, node in enumerate(self.meta.object_graph_def.nodes):
            if node.WhichOneof("kind") != "variable" or node_id >= len(graph.nodes):
                continue
            keys = [a.checkpoint_key for a in graph.nodes[node_id].attributes if a.name == "VARIABLE_VALUE"]
            if keys and keys[0] in shapes:
                key = keys[0]
                self.variables[node_id] = Variable(
                    node_id, node.variable.name, key, tuple(shapes[key]), dtypes[key].name
                )

    def _graph_variables(self):
        """{variable op name: Variable} of a TF1 graph, keyed in the checkpoint as its Saver writes them."""
        nodes = {n.name: n for n in self.meta.graph_def.node}
        keys = {}
        for node in self.meta.graph_def.node:  # the Saver's SaveV2: tensor_names[i] is tensors[i]'s key
            if node.op != "SaveV2":
                continue
            names_node = nodes.get(split_ref(node.input[1])[0])
            if names_node is None or names_node.op != "Const":
                continue
            names = [n.decode() for n in tensor_util.MakeNdarray(names_node.attr["value"].tensor).ravel()]
            for key, ref in zip(names, node.input[3:], strict=False):
                source = nodes.get(split_ref(ref)[0])
                while source is not None and source.op in ("Identity", "ReadVariableOp"):
                    source = nodes.get(split_ref(source.input[0])[0])
                if source is not None and source.op in VARIABLE_OPS:
                    keys[source.name] = key
        found = {}
        if self.reader is None:
            return found
        for node in self.meta.graph_def.node:
            key = keys.get(node.name, node.name)
            if node.op in VARIABLE_OPS and key in self.shapes:
                found[node.name] = Variable(
                    node.name, node.name, key, tuple(self.shapes[key]), self.dtypes[key].name
                )
        self.variables.update(found)
        return found

    def value(self, variable: Variable) -> np.ndarray:
        return self.reader.get_tensor(variable.key)

    def _resolve_resource_arguments(self):
        """{(function, argument name): Variable} for every resource argument that is a saved variable."""
        resolved = {}
        for name, concrete in self.meta.object_graph_def.concrete_functions.items():
            fdef = self.functions.get(name)
            if fdef is None or not concrete.bound_inputs:
                continue
            args = fdef.signature.input_arg[-len(concrete.bound_inputs) :]
            for arg, node_id in zip(args, concrete.bound_inputs, strict=True):
                if node_id in self.variables:
                    resolved[(name, arg.name)] = self.variables[node_id]
        changed = True
        while changed:  # into the functions that call ops call, until nothing new is learnt
            changed = False
            for name, fdef in self.functions.items():
                for node in fdef.node_def:
                    if node.op not in CALL_OPS or node.attr["f"].func.name not in self.functions:
                        continue
                    callee = self.functions[node.attr["f"].func.name]
                    data_inputs = [i for i in node.input if not i.startswith("^")]
                    for arg, ref in zip(callee.signature.input_arg, data_inputs, strict=False):
                        variable = resolved.get((name, ref))
                        key = (callee.signature.name, arg.name)
                        if variable is not None and key not in resolved:
                            resolved[key] = variable
                            changed = True
        return resolved

    # -- reading functions ----------------------------------------------------------------------------------

    def model_functions(self):
        """Where model ops live: the library's functions except TensorFlow's checkpoint save/restore
        functions, and for TF1 models the graph itself (one GraphBody, so its maps are cached too)."""
        if not hasattr(self, "_bodies"):
            bodies = [f for n, f in self.functions.items() if not n.startswith(SAVER_FUNCTIONS)]
            self._bodies = [*bodies, GraphBody(self.meta)] if self.tf1 else bodies
        return self._bodies

    def nodes(self, fdef):
        """{name: node} of a function of this (never modified) model, built once per function."""
        return self._maps(fdef)[0]

    def consumers(self, fdef):
        """{node name: [nodes that take one of its outputs as data input]}, built once per function."""
        return self._maps(fdef)[1]

    def _maps(self, fdef):
        cache = self.__dict__.setdefault("_map_cache", {})
        entry = cache.get(id(fdef))
        if entry is None or entry[0] is not fdef:  # the body is kept in the entry: its id stays its own
            nodes = {node.name: node for node in fdef.node_def}
            consumers = {}
            for node in fdef.node_def:
                for ref in node.input:
                    if not ref.startswith("^"):
                        consumers.setdefault(split_ref(ref)[0], []).append(node)
            entry = cache[id(fdef)] = (fdef, nodes, consumers)
        return entry[1], entry[2]

    def read_variable(self, fdef, ref):
        """The Variable a tensor reference reads (through ReadVariableOp and Identity), or None."""
        nodes = self.nodes(fdef)
        node_name, _, _ = split_ref(ref)
        node = nodes.get(node_name)
        while node is not None and node.op == "Identity":
            node_name, _, _ = split_ref(node.input[0])
            node = nodes.get(node_name)
        if node is not None and node.op in VARIABLE_OPS and isinstance(fdef, GraphBody):
            return self.graph_variables.get(node.name)  # a TF1 reference variable (through its /read)
        if node is None or node.op != "ReadVariableOp":
            return None
        resource = split_ref(node.input[0])[0]
        if isinstance(fdef, GraphBody):
            return self.graph_variables.get(resource)
        return self.arg_variables.get((fdef.signature.name, resource))

    def evaluate(self, fdef, ref, _memo=None):
        """The value of a tensor of a function that depends only on constants and saved variables.

        Raises:
          RewriteError: the tensor depends on an input, or on an op that cannot be evaluated here.
        """
        memo = {} if _memo is None else _memo
        if ref in memo:
            return memo[ref]
        nodes = self.nodes(fdef)
        node_name, out_arg, index = split_ref(ref)
        node = nodes.get(node_name)
        where = f"{fdef.signature.name}/{node_name}"
        if node is None:
            raise RewriteError(f"{where}: depends on the function input {node_name!r}, not only on variables")
        if node.op == "Const":
            value = tensor_util.MakeNdarray(node.attr["value"].tensor)
        elif node.op in ("ReadVariableOp", "Identity", *VARIABLE_OPS) and self.read_variable(fdef, ref):
            value = self.value(self.read_variable(fdef, ref))
        elif node.op == "ReadVariableOp" or node.op in VARIABLE_OPS:
            variable = self.read_variable(fdef, ref)
            if variable is None:
                raise RewriteError(f"{where}: reads a resource that is not a saved variable")
            value = self.value(variable)
        elif node.op in CALL_OPS or node.op.startswith(PLUGIN_PREFIX) or node.op == "Placeholder":
            raise RewriteError(f"{where}: a {node.op} op, not a constant expression of variables")
        else:
            inputs = [self.evaluate(fdef, i, memo) for i in node.input if not i.startswith("^")]
            value = _run_op(node, inputs, _flat_output_index(node, out_arg, index))
        memo[ref] = value
        return value


def _flat_output_index(node, out_arg, index):
    """The position among a node's outputs of `out_arg:index` (FunctionDef naming), from the op's OpDef."""
    op_def = op_def_registry.get(node.op)
    if op_def is None or out_arg is None:
        return index
    flat = 0
    for arg in op_def.output_arg:
        if arg.name == out_arg:
            return flat + index
        if arg.number_attr:
            flat += node.attr[arg.number_attr].i
        elif arg.type_list_attr:
            flat += len(node.attr[arg.type_list_attr].list.type)
        else:
            flat += 1
    raise RewriteError(f"{node.name}: {node.op} has no output {out_arg!r}")


def _run_op(node, inputs, output_index):
    """Runs one stock op on numpy inputs in a throwaway graph."""
    graph = tf.Graph()
    with graph.as_default():
        feeds = [tf.constant(v, name=f"input_{i}") for i, v in enumerate(inputs)]
        op = node_def_pb2.NodeDef()
        op.CopyFrom(node)
        op.name, op.device = "op", ""
        if "_class" in op.attr:  # colocation with nodes that are not in this graph
            del op.attr["_class"]
        del op.input[:]
        op.input.extend(t.op.name for t in feeds)
        graph_def = graph.as_graph_def()
        graph_def.node.append(op)
    run = tf.Graph()
    with run.as_default():
        try:
            tf.graph_util.import_graph_def(graph_def, name="")
            with tf.compat.v1.Session(graph=run) as session:
                return session.run(f"op:{output_index}")
        except (tf.errors.OpError, ValueError) as e:
            raise RewriteError(f"{node.name}: cannot evaluate {node.op} ({e})") from None


def rename_output(fdef, node_name, old_arg, new_arg):
    """References to `node_name`'s output `old_arg` (FunctionDef naming) become `new_arg`: what a node that
    changes op in place needs (GraphDef references name outputs by index, so there is nothing to do)."""
    old, new = f"{node_name}:{old_arg}:", f"{node_name}:{new_arg}:"
    for node in fdef.node_def:
        for k, ref in enumerate(node.input):
            if ref.startswith(old):
                node.input[k] = new + ref[len(old) :]
    for key, ref in fdef.ret.items():
        if ref.startswith(old):
            fdef.ret[key] = new + ref[len(old) :]


def stripped_op_names(meta):
    """Every op the meta graph's graph and functions use."""
    ops = {n.op for n in meta.graph_def.node}
    for f in meta.graph_def.library.function:
        ops.update(n.op for n in f.node_def)
    return ops


def plugin_nodes(meta):
    """`function/node (op)` for every tf_lora op left in the meta graph."""
    found = [f"{n.name} ({n.op})" for n in meta.graph_def.node if n.op.startswith(PLUGIN_PREFIX)]
    for f in meta.graph_def.library.function:
        found += [
            f"{f.signature.name}/{n.name} ({n.op})" for n in f.node_def if n.op.startswith(PLUGIN_PREFIX)
        ]
    return found


def write_saved_model(files: SavedModelFiles, proto, new_values: dict, out, overwrite=False, finish=None):
    """Writes `proto` with the checkpoint of `files`, `new_values` {checkpoint key: array} replacing values,
    to `out` (a SavedModel directory, or for a MetaGraphDef file a directory with `<name>.meta` and the
    checkpoint `<name>`): staged in a temporary directory beside it and renamed into place only once complete.
    `finish(staging_dir) -> dir` may turn the staged copy into the final one (inject re-saves it)."""
    out, staging = prepare_output(files, out, overwrite)
    final = staging
    try:
        for meta in [proto] if files.kind in ("meta_graph", "graph_def") else proto.meta_graphs:
            used = stripped_op_names(meta)
            kept = [op for op in meta.meta_info_def.stripped_op_list.op if op.name in used]
            del meta.meta_info_def.stripped_op_list.op[:]
            meta.meta_info_def.stripped_op_list.op.extend(kept)
        if files.kind in ("meta_graph", "graph_def"):  # OUT/<name>.meta (or .pb), checkpoint OUT/<name>
            os.makedirs(staging)
            base = os.path.basename(files.prefix)
            if files.kind == "meta_graph":
                with open(os.path.join(staging, base + ".meta"), "wb") as f:
                    f.write(proto.SerializeToString())
            else:
                with open(os.path.join(staging, base + ".pb"), "wb") as f:
                    f.write(proto.graph_def.SerializeToString())
            _write_checkpoint(files.reader, new_values, os.path.join(staging, base))
            with open(os.path.join(staging, "checkpoint"), "w") as f:
                f.write(f'model_checkpoint_path: "{base}"\nall_model_checkpoint_paths: "{base}"\n')
        else:
            shutil.copytree(files.path, staging, ignore=shutil.ignore_patterns("variables", "fingerprint.pb"))
            with open(os.path.join(staging, "saved_model.pb"), "wb") as f:
                f.write(proto.SerializeToString())
            if files.reader is not None:
                os.makedirs(os.path.join(staging, "variables"))
                _write_checkpoint(files.reader, new_values, os.path.join(staging, "variables", "variables"))
            if files.kind == "saved_model":
                _write_fingerprint(staging)
        if finish is not None:
            final = finish(staging)
        install_output(final, out)
    finally:
        for leftover in {staging, final}:
            shutil.rmtree(leftover, ignore_errors=True)


def check_output(source, out, overwrite):
    """Checks that a rewrite of the model at `source` may write `out`; returns OUT's real path. OUT must not
    be the input, hold it, or lie inside it; an existing OUT must be a directory and needs `overwrite`; a
    missing OUT needs an existing ancestor that is a directory (its missing parents are created later)."""
    out = os.path.realpath(os.fspath(out))
    source = os.path.realpath(os.fspath(source))
    model_dir = source if os.path.isdir(source) else os.path.dirname(source)
    if (
        out == model_dir
        or source.startswith(out + os.sep)
        or out.startswith(model_dir + os.sep)
        and (os.path.isdir(source))
    ):
        raise RewriteError(f"{out}: the output must not be the input, contain it, or lie inside it")
    if os.path.lexists(out):
        if not os.path.isdir(out) or os.path.islink(out):
            raise RewriteError(f"{out} exists and is not a directory; refusing to replace it")
        if not overwrite:
            raise RewriteError(f"{out} exists (pass --overwrite / overwrite=True to replace it)")
    ancestor = os.path.dirname(out)
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise RewriteError(f"{out}: cannot be created, {ancestor} is not a directory")
    return out


def make_parents(out):
    """Creates OUT's missing parent directories; returns those it created (outermost first), for a caller
    that removes them again when it writes nothing."""
    missing = []
    parent = os.path.dirname(out)
    while not os.path.isdir(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    created = []
    try:
        for directory in reversed(missing):
            os.mkdir(directory)
            created.append(directory)
    except OSError as e:
        remove_if_empty(created)
        raise RewriteError(f"{out}: cannot be created ({e.strerror}: {e.filename})") from None
    return created


def remove_if_empty(directories):
    """Removes directories (given outermost first) that are empty, innermost first."""
    for directory in reversed(directories):
        try:
            os.rmdir(directory)
        except OSError:
            return


def prepare_output(files, out, overwrite):
    """Checks where a rewrite may write (`check_output`), creates OUT's missing parents and returns
    (OUT, a fresh staging path beside it)."""
    out = check_output(files.path, out, overwrite)
    make_parents(out)
    staging = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.tf_lora_tmp_{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    return out, staging


@contextlib.contextmanager
def staged_output(source, out, overwrite=False):
    """For a caller that checks a rewrite before it is installed (the command line's --verify): checks OUT as
    `prepare_output` does and yields a fresh path beside it for the rewrite to write. When the block ends
    without an exception, the directory written there replaces OUT (atomically, as `install_output` does);
    when it raises, that directory and the parents created for OUT are removed, and an existing OUT is left
    as it was."""
    out = check_output(source, out, overwrite)
    created = make_parents(out)
    staging = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.tf_lora_stage_{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    installed = False
    try:
        yield staging
        if not os.path.isdir(staging):
            raise RewriteError(f"{out}: the rewrite wrote nothing")
        if os.path.lexists(out) and not overwrite:
            raise RewriteError(f"{out} exists (pass --overwrite / overwrite=True to replace it)")
        install_output(staging, out)
        installed = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not installed:
            remove_if_empty(created)


def install_output(final, out):
    """Renames the complete `final` to `out`; an old `out` is moved aside first and removed only after."""
    old = None
    if os.path.exists(out):
        old = f"{out}.tf_lora_old_{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
    try:
        os.rename(final, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_checkpoint(reader, new_values, prefix):
    """The reader's tensors with `new_values` {key: array} replacing or adding entries (the object graph too,
    under its key)."""
    keys = sorted(set(reader.get_variable_to_shape_map()) | set(new_values))
    tensors = []
    for key in keys:
        value = new_values[key] if key in new_values else reader.get_tensor(key)
        tensors.append(tf.constant(value))
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=keys, shape_and_slices=[""] * len(keys), tensors=tensors)


def _write_fingerprint(path):
    try:
        from tensorflow.python.saved_model import fingerprinting_utils  # noqa: PLC0415 - private, optional

        fingerprinting_utils.write_fingerprint(path)
    except (ImportError, AttributeError, ValueError):  # the fingerprint is optional; TF loads without it
        pass
