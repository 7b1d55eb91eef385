"""A model on disk, read once and never written to, with the questions graph rewrites ask of it.

Four formats: a TF2 SavedModel (its functions live in the graph's function library; variables reach them as
resource arguments), a TF1 SavedModel (simple_save / Builder), a MetaGraphDef `.meta` file and a bare GraphDef
`.pb`/`.pbtxt`, the last two with their checkpoint beside them. TF1 graphs are read like one function,
`GraphBody`.
"""

import os

import numpy as np
import tensorflow as tf
from google.protobuf import text_format
from google.protobuf.message import DecodeError
from tensorflow.core.framework import graph_pb2
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2, trackable_object_graph_pb2

from tf_lora.rewrite import constant_eval
from tf_lora.rewrite.errors import RewriteError
from tf_lora.rewrite.graph_defs import SAVER_FUNCTIONS, VARIABLE_OPS, GraphBody, split_ref
from tf_lora.rewrite.variables import Variable, object_graph_variables, resource_arguments, saver_variables

OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"


class ModelFiles:
    """The protos and checkpoint of a model (`kind`: "saved_model", "saved_model_v1", "meta_graph" or
    "graph_def"), and `variables` {id: Variable} read from them."""

    def __init__(self, path):
        self.path = os.fspath(path)
        if os.path.isfile(self.path) and self.path.endswith(".meta"):
            self.kind = "meta_graph"
            self.proto = _parse(meta_graph_pb2.MetaGraphDef(), self.path, "MetaGraphDef")
            self.meta = self.proto
            self.prefix = self.path[: -len(".meta")]
        elif os.path.isfile(self.path) and os.path.basename(self.path) in (
            "saved_model.pb",
            "saved_model.pbtxt",
        ):
            directory = os.path.dirname(os.path.abspath(self.path))
            raise RewriteError(f"{self.path}: a SavedModel's own file; pass its directory, {directory}")
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
                _parse(graph_def, self.path, "GraphDef")
            self.proto = meta_graph_pb2.MetaGraphDef(graph_def=graph_def)
            self.meta = self.proto
            self.prefix = os.path.splitext(self.path)[0]
        else:
            pb = os.path.join(self.path, "saved_model.pb")
            if os.path.isfile(self.path):
                raise RewriteError(
                    f"{self.path}: not a model tf-lora reads (a SavedModel directory, a .meta file, or a "
                    "GraphDef .pb/.pbtxt with its checkpoint); a Keras .keras file: load it and "
                    "model.export(DIR) first"
                )
            if not os.path.isdir(self.path):
                raise RewriteError(f"{self.path}: no such file or directory")
            if not os.path.isfile(pb):
                raise RewriteError(f"{self.path}: not a SavedModel directory (no saved_model.pb)")
            self.proto = _parse(saved_model_pb2.SavedModel(), pb, "SavedModel")
            if not self.proto.meta_graphs:
                raise RewriteError(f"{pb}: holds no meta graph")
            serve = [m for m in self.proto.meta_graphs if "serve" in m.meta_info_def.tags]
            self.meta = (serve or list(self.proto.meta_graphs))[0]
            self.kind = "saved_model" if self.meta.object_graph_def.nodes else "saved_model_v1"
            self.prefix = os.path.join(self.path, "variables", "variables")
        self.functions = {f.signature.name: f for f in self.meta.graph_def.library.function}
        self._read_checkpoint()
        self.arg_variables, self.graph_variables = {}, {}
        if self.kind == "saved_model":
            self.arg_variables = resource_arguments(self.meta, self.functions, self.variables)
        else:
            self.graph_variables = self.variables

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

    def _read_checkpoint(self):
        self.variables = {}
        self.reader = self.checkpoint_graph = None
        if not os.path.exists(self.prefix + ".index"):
            if self.kind in ("meta_graph", "graph_def"):
                raise RewriteError(f"{self.path}: no checkpoint beside it ({self.prefix}.index)")
            if self._has_variables():  # a SavedModel without variables has no checkpoint, rightly
                raise RewriteError(
                    f"{self.path}: its variables are missing: no checkpoint {self.prefix}.index (a "
                    "SavedModel keeps them in variables/; was the directory copied whole?)"
                )
            return
        try:
            self.reader = tf.train.load_checkpoint(self.prefix)
            shapes = self.reader.get_variable_to_shape_map()
            dtypes = self.reader.get_variable_to_dtype_map()
            if self.kind == "saved_model":
                graph = trackable_object_graph_pb2.TrackableObjectGraph()
                graph.ParseFromString(self.reader.get_tensor(OBJECT_GRAPH_KEY))
                self.checkpoint_graph = graph
        except (tf.errors.OpError, DecodeError, ValueError, IndexError) as e:
            raise RewriteError(f"{self.prefix}: unreadable checkpoint ({e})") from None
        if self.kind == "saved_model":
            self.variables = object_graph_variables(self.meta, self.checkpoint_graph, shapes, dtypes)
        else:
            self.variables = saver_variables(self.meta, shapes, dtypes)

    def _has_variables(self):
        if self.kind == "saved_model":
            return any(node.HasField("variable") for node in self.meta.object_graph_def.nodes)
        return any(node.op in (*VARIABLE_OPS, "VarHandleOp") for node in self.meta.graph_def.node)

    def value(self, variable: Variable) -> np.ndarray:
        try:
            return self.reader.get_tensor(variable.key)
        except (tf.errors.OpError, IndexError, ValueError) as e:  # a truncated data file: IndexError
            raise RewriteError(
                f"{self.prefix}: unreadable checkpoint, reading {variable.name} ({e})"
            ) from None

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

    def read_variable(self, fdef, ref, through_cast=False):
        """The Variable a tensor reference reads (through ReadVariableOp and Identity; with `through_cast`,
        Cast too: a mixed-precision layer casts its float32 weight to the compute dtype), or None."""
        nodes = self.nodes(fdef)
        node_name, _, _ = split_ref(ref)
        node = nodes.get(node_name)
        while node is not None and (node.op == "Identity" or (through_cast and node.op == "Cast")):
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

    def evaluate(self, fdef, ref):
        """The value of a tensor of a function that depends only on constants and saved variables
        (tf_lora.rewrite.constant_eval).

        Raises:
          RewriteError: the tensor depends on an input, or on an op that cannot be evaluated here.
        """
        return constant_eval.evaluate(self, fdef, ref)


def _parse(message, path, what):
    try:
        with open(path, "rb") as f:
            message.ParseFromString(f.read())
    except DecodeError as e:
        raise RewriteError(f"{path}: corrupted {what} proto ({e})") from None
    return message
