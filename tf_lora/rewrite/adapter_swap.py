"""swap-adapter: new adapter weights (PEFT or kohya files) into the LoRA applies of a SavedModel."""

import dataclasses
import os
import re

import numpy as np
from tensorflow.core.framework import node_def_pb2
from tensorflow.python.framework import dtypes, tensor_util

from tf_lora.adapters.kohya import load_kohya
from tf_lora.adapters.module_names import module_mapper
from tf_lora.adapters.peft import load_peft
from tf_lora.rewrite.errors import RewriteError
from tf_lora.rewrite.folding import column_scale
from tf_lora.rewrite.graph_defs import GraphBody, layer_of, split_ref
from tf_lora.rewrite.lora_patterns import BATCHED_LORA_APPLY, LORA_APPLY, projection_under, projection_weight
from tf_lora.rewrite.model_files import ModelFiles
from tf_lora.rewrite.saved_model_writer import write_saved_model


@dataclasses.dataclass
class SwapReport:
    swapped: dict  # file module -> the layer (weight variable name without its last part) it went to
    unmatched_modules: list
    layers_without_adapter: list


def load_adapter_file(path, sha256=None) -> dict:
    """A PEFT directory or a kohya .safetensors file, as {module: Adapter}."""
    path = os.fspath(path)
    if os.path.basename(path) == "adapter_config.json":  # a PEFT directory named by its config
        path = os.path.dirname(path) or "."
    try:
        if os.path.isdir(path):
            return load_peft(path, sha256=sha256)
        return load_kohya(path, sha256=sha256)
    except (OSError, ValueError) as e:
        raise RewriteError(f"adapter {path}: {e}") from None


def swap_adapter(model_dir, out_dir, adapters, mapping=None, strict=True, overwrite=False, progress=None):
    """Writes a copy of the SavedModel `model_dir` whose LoRA applies carry the weights of `adapters`.

    Each `TfLora>LoraApply` is named by the layer of its base weight, the weight of the MatMul, Einsum or
    BatchMatMul projection under it (the weight variable's name without its last part: `q_proj/kernel` ->
    `q_proj`; a bare variable name stays whole). An Einsum's adapter is `[in, out]`, its kernel seen through
    its equation (einsum_kernels), as PEFT's adapter of the equivalent Linear is (a BatchMatMul's: its weight
    made the matrix it multiplies by, batch_matmuls). File modules map to those
    names as in `tf_lora.adapters.apply` (`mapping`: None, a function or (regex, replacement) pairs). A and B
    are written into the adapter's variables (same rank required) and the apply's scale becomes the file's.

    Args:
      adapters: `{module: Adapter}`, or a path (PEFT directory or kohya file).
      strict: A file module that maps to no apply is an error (else reported).

    Raises:
      RewriteError: every mismatch (rank, shapes, merged adapters, unmatched modules), nothing written.
    """
    say = progress or (lambda _msg: None)
    if not isinstance(adapters, dict):
        adapters = load_adapter_file(adapters)
    files = ModelFiles(model_dir)
    proto, meta = files.copy_proto()
    functions = {f.signature.name: f for f in meta.graph_def.library.function}
    if files.tf1:
        functions["graph"] = GraphBody(meta)

    applies = {}  # layer -> [(function, node, a Variable, b Variable)]
    batched, dora = set(), set()  # layers with a multi-adapter apply; layers whose apply is DoRA
    problems = _file_problems(adapters)
    for fdef in files.model_functions():
        nodes = files.nodes(fdef)
        for node in fdef.node_def:
            if node.op == BATCHED_LORA_APPLY:
                batched.add(layer_of(_base_weight(files, fdef, nodes, node.input[0])))
            if node.op != LORA_APPLY:
                continue
            where = f"{fdef.signature.name}/{node.name}"
            y_ref, x_ref, a_ref, b_ref, scale_ref = [i for i in node.input if not i.startswith("^")]
            a_var = files.read_variable(fdef, a_ref, through_cast=True)
            b_var = files.read_variable(fdef, b_ref, through_cast=True)
            if a_var is None or b_var is None:
                problems.append(f"{where}: A and B are not read straight from saved variables")
                continue
            base = _base_weight(files, fdef, nodes, y_ref)
            layer = layer_of(base)
            if _is_dora(files, fdef, nodes, node):
                dora.add(layer)
            try:
                scale = float(files.evaluate(fdef, scale_ref))
            except RewriteError as e:
                problems.append(str(e))
                continue
            if scale == 0.0:
                problems.append(
                    f"{where}: scale 0, the adapter is merged into {base} (unmerge before saving)"
                )
                continue
            applies.setdefault(layer, []).append((fdef.signature.name, node.name, a_var, b_var))

    to_layer = module_mapper(mapping)
    updates, swapped, unmatched = {}, {}, []
    for module, adapter in sorted(adapters.items()):
        try:
            layer = to_layer(module)
        except (re.error, IndexError) as e:  # a replacement naming a group the pattern does not have
            raise RewriteError(
                "swap-adapter: nothing written; the mapping's replacement for module "
                f"{module!r} is not valid ({e})"
            ) from None
        if layer in dora:
            problems.append(
                f"{module} -> {layer}: the model's adapter there is DoRA (its output is scaled by "
                "magnitude / ||w + s a b||), whose magnitude swap-adapter does not write"
            )
            continue
        if layer not in applies:
            if layer in batched:
                problems.append(
                    f"{module} -> {layer}: that layer holds several adapters (a BatchedLoraApply), which "
                    "swap-adapter does not write into; swap in Python (tf_lora.adapters.apply with "
                    "adapter_name) and export again"
                )
            else:
                unmatched.append(module)
            continue
        for fn, node_name, a_var, b_var in applies[layer]:
            if tuple(adapter.a.shape) != a_var.shape or tuple(adapter.b.shape) != b_var.shape:
                problems.append(
                    f"{module} -> {layer} ({fn}/{node_name}): adapter a {list(adapter.a.shape)}, b "
                    f"{list(adapter.b.shape)}; the model's {a_var.name} {list(a_var.shape)}, {b_var.name} "
                    f"{list(b_var.shape)}"
                )
                continue
            if not (np.all(np.isfinite(adapter.a)) and np.all(np.isfinite(adapter.b))):
                problems.append(f"{module}: NaN or Inf weights")
                continue
            updates[a_var.key] = adapter.a.astype(files.value(a_var).dtype)
            updates[b_var.key] = adapter.b.astype(files.value(b_var).dtype)
            _set_scale(functions[fn], node_name, adapter.scale)
            swapped[module] = layer
    if strict and unmatched:
        problems.append(
            f"modules that match no LoRA apply: {unmatched} (layers: {sorted(applies)}; pass a mapping)"
        )
    if problems:
        raise RewriteError("swap-adapter: nothing written; " + "; ".join(problems))
    say(f"write {out_dir}")
    write_saved_model(files, proto, updates, out_dir, overwrite=overwrite)
    return SwapReport(swapped, unmatched, sorted(set(applies) - set(swapped.values())))


def _file_problems(adapters):
    """What of an adapter file swap-adapter cannot write (it writes A, B and the scale): DoRA magnitudes,
    trained biases, whole replaced modules. Refused rather than dropped: the outputs would be wrong."""
    problems = []
    for module, adapter in sorted(adapters.items()):
        if adapter.magnitude is not None:
            problems.append(f"{module}: a DoRA adapter (its magnitude vector)")
        if adapter.bias is not None:
            problems.append(f"{module}: a trained bias")
    replaced = sorted(getattr(adapters, "replacements", None) or {})
    if replaced:
        problems.append(f"whole modules the file replaces (modules_to_save) {replaced}")
    if problems:
        problems[-1] += (
            "; swap-adapter writes A, B and the scale only: apply the file in Python "
            "(tf_lora.adapters.apply on the Keras model) and export again"
        )
    return problems


def _is_dora(files, fdef, nodes, node):
    """Whether a LoRA apply's output is scaled per column by variables only (DoRA), as fold sees it."""
    projection = projection_under(nodes, node.input[0])
    weight = None if projection is None else projection_weight(files, fdef, projection, through_cast=True)
    try:
        return weight is not None and column_scale(files, fdef, node, projection, weight) is not None
    except RewriteError:  # an Einsum fold could not read either
        return False


def _base_weight(files, fdef, nodes, y_ref):
    """The name of the weight variable of the MatMul, Einsum or BatchMatMul under the apply's y (or the y
    node's name)."""
    node = projection_under(nodes, y_ref)
    if node is not None:
        weight = projection_weight(files, fdef, node, through_cast=True)
        if weight is not None:
            return weight.name
    return split_ref(y_ref)[0]


def _set_scale(fdef, node_name, scale):
    """The apply's scale input becomes a new Const with the adapter's scale (the old scale expression is left
    without this consumer)."""
    node = next(n for n in fdef.node_def if n.name == node_name)
    const = node_def_pb2.NodeDef(name=f"{node_name}/swapped_scale", op="Const")
    dtype = node.attr["T"].type
    const.attr["dtype"].type = dtype
    value = np.array(scale, dtypes.as_dtype(dtype).as_numpy_dtype)
    const.attr["value"].tensor.CopyFrom(tensor_util.make_tensor_proto(value))
    existing = [n for n in fdef.node_def if n.name == const.name]
    if existing:
        existing[0].CopyFrom(const)
    else:
        fdef.node_def.append(const)
    data_positions = [k for k, i in enumerate(node.input) if not i.startswith("^")]
    node.input[data_positions[4]] = const.name if isinstance(fdef, GraphBody) else f"{const.name}:output:0"
