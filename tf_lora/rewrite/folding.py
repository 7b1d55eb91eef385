"""fold: every LoRA apply on a MatMul becomes that MatMul with W' = W + scale * A @ B, and every one on an
Einsum projection that Einsum with its kernel plus scale * A @ B in the kernel's layout (stock TF only)."""

import collections
import dataclasses
import re

import numpy as np

from tf_lora.rewrite.einsum_kernels import equation
from tf_lora.rewrite.errors import RewriteError
from tf_lora.rewrite.graph_defs import (
    CALL_OPS,
    VARIABLE_OPS,
    GraphBody,
    plugin_nodes,
    rename_output,
    split_ref,
)
from tf_lora.rewrite.lora_patterns import (
    BATCHED_LORA_APPLY,
    LORA_APPLY,
    SHAPE_OPS,
    projection_under,
    projection_view,
    projection_weight,
    row_sources,
    stack_names,
)
from tf_lora.rewrite.model_files import ModelFiles
from tf_lora.rewrite.saved_model_writer import write_saved_model

# What a TF1 graph does to every variable besides reading it: initialize it and check that it is.
_TF1_INIT_OPS = ("VarIsInitializedOp", "AssignVariableOp", "Assign", "IsVariableInitialized")


@dataclasses.dataclass
class Fold:
    """One LoRA apply and what became of it."""

    function: str
    node: str
    weight: str  # the base weight's variable name
    adapter: str  # the adapter's A variable name
    rank: int
    scale: float
    folded: bool  # False: the apply was dropped (--adapter chose another)


@dataclasses.dataclass
class FoldReport:
    folds: list
    weights: dict  # weight variable name -> number of adapters folded into it


def fold(model_dir, out_dir, adapter=None, overwrite=False, progress=None) -> FoldReport:
    """Writes a copy of the SavedModel `model_dir` to `out_dir` in which every `TfLora>LoraApply` on a
    MatMul is folded into that MatMul's weight, and every one on the rows of an Einsum projection
    (LoraEinsumDense, or inject on an EinsumDense) into that Einsum's kernel: `scale * A @ B` is `[in, out]`,
    the kernel seen through the equation (einsum_kernels), put back in the kernel's layout. The copy runs on
    stock TensorFlow.

    Args:
      model_dir: A TF2 SavedModel.
      out_dir: Where the copy goes (staged, then renamed into place; refused if it exists unless
        `overwrite`).
      adapter: A regex; only adapters whose A variable's name matches it are folded, the other applies are
        dropped (the model then serves the chosen adapter alone); one that matches no adapter is an error.
        None folds every adapter.
      progress: Optional callable(str) told about each step.

    Raises:
      RewriteError: a pattern that cannot be folded (named), or an unreadable model; nothing is written.
    """
    say = progress or (lambda _msg: None)
    files = ModelFiles(model_dir)
    proto, meta = files.copy_proto()
    functions = {f.signature.name: f for f in meta.graph_def.library.function}
    if files.tf1:
        functions["graph"] = GraphBody(meta)
    chooser = re.compile(adapter) if adapter is not None else None

    folds, deltas, problems = [], collections.defaultdict(dict), []
    projections_folded = collections.defaultdict(set)  # weight node id -> {(function, MatMul or Einsum node)}
    kinds = collections.defaultdict(
        set
    )  # weight node id -> {"MatMul", "Einsum"}: the ops that multiply by it
    applies = []  # (function, nodes, apply node): where --adapter looked
    exempt = set()  # (function, node): reads of a weight that only fed a folded column scale (now removed)
    for original in files.model_functions():
        fdef = functions[original.signature.name]
        nodes = files.nodes(original)
        for node in original.node_def:
            if node.op not in (LORA_APPLY, BATCHED_LORA_APPLY):
                continue
            applies.append((original, nodes, node))
            say(f"fold {original.signature.name}/{node.name}")
            try:
                found = fold_one(files, original, nodes, node, chooser)
            except RewriteError as e:
                problems.append(str(e))
                continue
            fold_info, weight, projection, delta = found
            if node.op == LORA_APPLY:  # DoRA: a column scale of the apply's output folds into the weight too
                scale = column_scale(files, original, node, projection, weight)
                if scale is not None:
                    mul, keep_ref, multiplier, removed = scale
                    if delta is not None:
                        w = files.value(weight).astype(np.float64)
                        delta = (w + delta) * multiplier - w
                    _replace_mul_with_identity(fdef, mul, keep_ref, removed)
                    exempt.update((original.signature.name, name) for name in removed)
            folds.append(fold_info)
            projections_folded[weight.node_id].add((original.signature.name, projection.name))
            kinds[weight.node_id].add(projection.op)
            if delta is None:  # dropped: this projection keeps the base weight, which must then stay as it is
                delta = np.zeros(weight.shape)
            deltas[weight.node_id].setdefault((original.signature.name, projection.name), []).append(delta)
            _replace_with_identity(fdef, next(n for n in fdef.node_def if n.name == node.name))
    left = plugin_nodes(meta)
    if left:
        problems.append(
            f"tf_lora ops that fold does not handle remain: {left} (fold folds LoRA applies on MatMuls and "
            "Einsum projections)"
        )
    if not folds and not problems:
        raise RewriteError(f"{files.path}: no LoRA apply to fold")
    if chooser is not None and folds and not any(f.folded for f in folds):
        names = sorted({name for apply in applies for name in _adapter_names(files, *apply)})
        problems.insert(0, f"--adapter {adapter!r} matches no adapter (adapters: {names})")
    problems += _check_weights_only_read_by_folded_projections(files, projections_folded, exempt)
    updates = {}
    for weight_id, per_projection in deltas.items():
        totals = {key: sum(ds) for key, ds in per_projection.items()}
        first = next(iter(totals.values()))
        if any(not np.array_equal(t, first) for t in totals.values()):
            problems.append(
                f"weight {files.variables[weight_id].name!r}: its {' and '.join(sorted(kinds[weight_id]))}s "
                "carry different adapters; one merged weight cannot serve them"
            )
            continue
        for variable in _weight_and_twins(files, files.variables[weight_id]):
            w = files.value(variable)
            updates[variable.key] = (w.astype(np.float64) + first).astype(w.dtype)
    if problems:
        raise RewriteError("fold: nothing written; " + "; ".join(problems))
    say(f"write {out_dir}")
    write_saved_model(files, proto, updates, out_dir, overwrite=overwrite)
    counts = collections.Counter()
    for f in folds:
        counts[f.weight] += f.folded
    return FoldReport(folds, dict(counts))


def fold_one(files, fdef, nodes, node, chooser):
    """Checks one LoraApply or BatchedLoraApply node and computes its update of the weight of the MatMul or
    Einsum under it: (Fold, weight Variable, MatMul or Einsum node, delta in the weight's layout or None when
    dropped)."""
    where = f"{fdef.signature.name}/{node.name}"
    data = [i for i in node.input if not i.startswith("^")]
    y_ref, x_ref = data[:2]
    projection = projection_under(nodes, y_ref)
    if projection is None:
        raise RewriteError(
            f"{where}: adds to {y_ref!r}, which is not (a bias added to) a MatMul, nor the rows of an Einsum "
            "or a BatchMatMul"
        )
    view = None
    if projection.op == "MatMul":
        if projection.attr["transpose_a"].b:
            raise RewriteError(f"{where}: its MatMul {projection.name} transposes its input")
        if not _same_tensor(projection.input[0], x_ref):
            raise RewriteError(
                f"{where}: its input {x_ref!r} is not its MatMul's input {projection.input[0]!r}"
            )
    weight = projection_weight(files, fdef, projection, through_cast=True)  # mixed precision too
    if weight is None:
        raise RewriteError(
            f"{where}: its {projection.op} {projection.name} does not multiply by a saved variable"
        )
    if projection.op != "MatMul":
        view = projection_view(files, fdef, projection, weight)
        if not set(row_sources(nodes, x_ref)) & set(row_sources(nodes, projection.input[0])):
            raise RewriteError(
                f"{where}: its input {x_ref!r} is not (a reshape of) its {projection.op}'s input "
                f"{projection.input[0]!r}"
            )
    _check_single_consumer_chain(files, fdef, nodes, node, projection)
    if node.op == LORA_APPLY:
        _check_xa_unread(fdef, node, where)
        a_var = files.read_variable(fdef, data[2], through_cast=True)
        adapter_name = a_var.name if a_var is not None else split_ref(data[2])[0]
        a, b = files.evaluate(fdef, data[2]), files.evaluate(fdef, data[3])
        scale = files.evaluate(fdef, data[4])
        if np.ndim(scale) != 0:
            raise RewriteError(f"{where}: scale is not a scalar")
        chosen = chooser is None or chooser.search(adapter_name) is not None
    else:
        adapter_name, a, b, scale, chosen = _batched_choice(files, fdef, nodes, node, data, chooser)
    delta = None
    if chosen:
        delta = float(scale) * (a.astype(np.float64) @ b.astype(np.float64))
        if view is not None:
            if delta.shape != (view.in_features, view.out_features):
                through = repr(equation(projection)) if projection.op == "Einsum" else f"its {projection.op}"
                raise RewriteError(
                    f"{where}: scale * A @ B is {delta.shape}, the kernel {weight.name} {weight.shape} seen "
                    f"through {through} {(view.in_features, view.out_features)}"
                )
            delta = view.to_kernel_layout(delta)
        elif projection.attr["transpose_b"].b:
            delta = delta.T
        if delta.shape != weight.shape:
            raise RewriteError(
                f"{where}: scale * A @ B is {delta.shape}, the weight {weight.name} {weight.shape}"
            )
    info = Fold(fdef.signature.name, node.name, weight.name, adapter_name, a.shape[1], float(scale), chosen)
    return info, weight, projection, delta


def _adapter_names(files, fdef, nodes, node):
    """What --adapter is matched against: a LoraApply's A variable, each adapter of a BatchedLoraApply."""
    data = [i for i in node.input if not i.startswith("^")]
    if node.op == LORA_APPLY:
        a_var = files.read_variable(fdef, data[2], through_cast=True)
        return [a_var.name if a_var is not None else split_ref(data[2])[0]]
    try:
        count = len(files.evaluate(fdef, data[2]))
    except RewriteError:
        return []
    return stack_names(files, fdef, nodes, data[2], count)


def _batched_choice(files, fdef, nodes, node, data, chooser):
    """The one adapter of a BatchedLoraApply that folding keeps: the one `chooser` names, else the one every
    row uses (LoraDense's active adapter: ids filled with one value). (name, a, b, scale, chosen)."""
    where = f"{fdef.signature.name}/{node.name}"
    a_stack, b_stack = files.evaluate(fdef, data[2]), files.evaluate(fdef, data[3])
    scales = np.atleast_1d(files.evaluate(fdef, data[5]))
    ranks = {}  # each adapter's own rank: the stack pads them to the largest
    names = stack_names(files, fdef, nodes, data[2], len(a_stack), ranks)
    if chooser is not None:
        ks = [k for k, name in enumerate(names) if chooser.search(name)]
        if len(ks) > 1:
            raise RewriteError(f"{where}: --adapter matches several of its adapters {[names[k] for k in ks]}")
        k = ks[0] if ks else -1
    else:
        k = _uniform_id(files, fdef, nodes, data[4], where)
    if k < 0:  # no adapter for any row: the apply goes, nothing is folded
        return (names[0] if names else where), a_stack[0], b_stack[0], 0.0, False
    if k >= len(a_stack):
        raise RewriteError(f"{where}: adapter id {k} is out of range for {len(a_stack)} adapters")
    rank = ranks.get(k, a_stack.shape[2])  # the padding is zeros: the product is the same
    return names[k], a_stack[k][:, :rank], b_stack[k][:rank], float(scales[k]), True


def _uniform_id(files, fdef, nodes, ref, where):
    """The adapter id every row uses, or a RewriteError when rows may differ."""
    node = nodes.get(split_ref(ref)[0])
    while node is not None and node.op in ("Reshape", "Identity", "Cast"):
        ref = node.input[0]
        node = nodes.get(split_ref(ref)[0])
    try:
        if node is not None and node.op == "Fill":
            return int(files.evaluate(fdef, node.input[1]))
        ids = np.unique(files.evaluate(fdef, ref))
    except RewriteError:
        ids = None
    if ids is None or len(ids) != 1:
        raise RewriteError(
            f"{where}: rows choose their adapters at run time (per-example ids); pick the one to fold with "
            "--adapter"
        )
    return int(ids[0])


def _same_tensor(ref1, ref2):
    return split_ref(ref1) == split_ref(ref2)


def _check_xa_unread(fdef, node, where):
    """LoraApply's second output, x @ a, is there for its gradient; folding turns the apply into Identity(y),
    which has none."""

    def reads_xa(ref):
        name, arg, index = split_ref(ref)
        return name == node.name and (arg == "xa" or (arg is None and index == 1))

    readers = [n.name for n in fdef.node_def if any(reads_xa(r) for r in n.input if not r.startswith("^"))]
    readers += [f"output {key}" for key, ref in fdef.ret.items() if reads_xa(ref)]
    if readers:
        raise RewriteError(
            f"{where}: its x @ a output (kept for the gradient) is read by {', '.join(sorted(readers))}: "
            "fold a model saved for inference, without gradients (a traced training step of the saved "
            "object is saved with it, signatures or not: export from an object without one, e.g. "
            "model.export())"
        )


def _check_single_consumer_chain(files, fdef, nodes, apply_node, projection):
    """The tensors between the MatMul (or Einsum) and the apply must feed nothing else: they would see the
    new weight. Ops that read only their shape (the Shape an Einsum's rows are reshaped back with) do not
    count."""
    consumers = files.consumers(fdef)
    returned = collections.Counter(split_ref(r)[0] for r in fdef.ret.values())
    step = nodes[split_ref(apply_node.input[0])[0]]
    while True:
        users = [c for c in consumers.get(step.name, ()) if c.op not in SHAPE_OPS]
        uses = len(users) + returned[step.name]
        if uses > 1 and step.op not in (LORA_APPLY, BATCHED_LORA_APPLY):
            raise RewriteError(
                f"{fdef.signature.name}/{apply_node.name}: {step.name} ({step.op}) between the "
                f"{projection.op} and the LoRA apply has other consumers, which would see the folded weight"
            )
        if step is projection:
            return
        step = nodes[split_ref(step.input[0])[0]]


def column_scale(files, fdef, node, projection, weight):
    """A LoRA apply whose only consumer multiplies it by a vector over its output columns that depends only
    on variables (DoRA's `magnitude / ||w + s a b||`, tf_lora's LoRA layers with `use_dora`): the scale
    folds into the weight, `w' = (w + s a b) * scale` per column. Returns (the Mul node, its input from the
    apply, the scale laid out on the weight, the names of the nodes that only computed the scale) or None."""
    consumers = files.consumers(fdef)
    users = consumers.get(node.name, ())
    if len(users) != 1 or users[0].op != "Mul":
        return None
    mul = users[0]
    data = [i for i in mul.input if not i.startswith("^")]
    mine = [i for i in data if split_ref(i)[0] == node.name]
    others = [i for i in data if split_ref(i)[0] != node.name]
    if len(mine) != 1 or len(others) != 1:
        return None
    try:
        factor = np.asarray(files.evaluate(fdef, others[0]), np.float64)
    except RewriteError:
        return None  # a scale that depends on the inputs multiplies the folded projection just as well
    if projection.op == "MatMul":
        out = weight.shape[0] if projection.attr["transpose_b"].b else weight.shape[1]
        rows = weight.shape[1] if projection.attr["transpose_b"].b else weight.shape[0]
    else:
        view = projection_view(files, fdef, projection, weight)
        out, rows = view.out_features, view.in_features
    if factor.ndim != 1 or factor.shape[0] != out:
        return None
    multiplier = np.ones((rows, 1)) * factor[None, :]
    if projection.op != "MatMul":
        multiplier = view.to_kernel_layout(multiplier)
    elif projection.attr["transpose_b"].b:
        multiplier = multiplier.T
    # The nodes that only fed the scale: nothing else reads them once the Mul is gone.
    nodes, removed, stack = files.nodes(fdef), set(), [split_ref(others[0])[0]]
    while stack:
        name = stack.pop()
        candidate = nodes.get(name)
        if candidate is None or name in removed:
            continue
        readers = {n.name for n in consumers.get(name, ())} | _control_readers(fdef, name)
        if not readers <= removed | {mul.name} or _is_output(fdef, name):
            continue
        removed.add(name)
        stack.extend(split_ref(i.lstrip("^"))[0] for i in candidate.input)
    return mul, mine[0], multiplier, removed


def _control_readers(fdef, name):
    return {n.name for n in fdef.node_def if f"^{name}" in n.input}


def _is_output(fdef, name):
    refs = list(getattr(fdef, "ret", {}).values()) + list(getattr(fdef, "control_ret", {}).values())
    return any(split_ref(ref)[0] == name for ref in refs)


def _replace_mul_with_identity(fdef, mul, keep_ref, removed):
    """The column scale's Mul becomes Identity(the apply's output), and the nodes that only computed the
    scale go."""
    node = next(n for n in fdef.node_def if n.name == mul.name)
    control = [i for i in node.input if i.startswith("^") and i[1:] not in removed]
    dtype = node.attr["T"].type
    node.op = "Identity"
    del node.input[:]
    node.input.extend([keep_ref, *control])
    node.attr.clear()
    node.attr["T"].type = dtype
    rename_output(fdef, node.name, "z", "output")
    kept = [n for n in fdef.node_def if n.name not in removed]
    del fdef.node_def[:]
    fdef.node_def.extend(kept)


def _replace_with_identity(fdef, node):
    """The apply becomes Identity(y): same name, so its consumers are rewired to y by the rename of its
    output (`y_out` -> `output`)."""
    data = [i for i in node.input if not i.startswith("^")]
    control = [i for i in node.input if i.startswith("^")]
    dtype = node.attr["T"].type
    node.op = "Identity"
    del node.input[:]
    node.input.extend([data[0], *control])
    node.attr.clear()
    node.attr["T"].type = dtype
    rename_output(fdef, node.name, "y_out", "output")


def _check_weights_only_read_by_folded_projections(files, projections_folded, exempt=frozenset()):
    """A folded weight used anywhere else would change meaning there. Every use of its resource must be a
    read whose consumers are folded MatMuls or Einsums, or a call into a function checked the same way;
    anything else (a gather on it, a cond or loop body fold cannot follow, an assignment) is refused."""
    problems = []
    saver = split_ref(files.meta.saver_def.save_tensor_name)[0].rsplit("/", 1)[0] + "/"

    def saver_node(consumers, n):
        return files.tf1 and (saver != "/" and n.name.startswith(saver) or _only_saves(consumers, n))

    for fdef in files.model_functions():
        nodes, consumers = files.nodes(fdef), files.consumers(fdef)
        fn = fdef.signature.name
        # The weight's resource: an argument bound to it (TF2), or its variable op (TF1 graphs).
        resources = {}
        if isinstance(fdef, GraphBody):
            for name, variable in files.graph_variables.items():
                if variable.node_id in projections_folded:
                    resources[name] = variable
        else:
            for (function, arg), variable in files.arg_variables.items():
                if function == fn and variable.node_id in projections_folded:
                    resources[arg] = variable
        for node in fdef.node_def:
            for ref in (i for i in node.input if not i.startswith("^")):
                variable = resources.get(split_ref(ref)[0])
                if variable is None or saver_node(consumers, node):
                    continue
                reads = node.op == "ReadVariableOp" or (
                    node.op == "Identity" and nodes.get(split_ref(ref)[0], node).op in VARIABLE_OPS
                )
                harmless = node.op in CALL_OPS or (files.tf1 and node.op in _TF1_INIT_OPS)
                if not reads and not harmless:
                    problems.append(
                        f"weight {variable.name!r} is used by {fn}/{node.name} ({node.op}), which fold "
                        "cannot rewrite with it"
                    )
                    continue
                if not reads:
                    continue
                for reader in _through_casts(consumers, node):
                    if saver_node(consumers, reader) or (fn, reader.name) in exempt:
                        continue
                    if (fn, reader.name) not in projections_folded[variable.node_id]:
                        problems.append(
                            f"weight {variable.name!r} is also read by {fn}/{reader.name} ({reader.op}), "
                            "which has no LoRA apply to fold"
                        )
    return sorted(set(problems))


def _through_casts(consumers, node):
    """The nodes that use a node's value, through Cast (a mixed-precision layer's weight in its compute
    dtype) and the Reshape and Transpose that make a weight the matrix of a BatchMatMul (batch_matmuls)."""
    found = []
    for user in consumers.get(node.name, ()):
        passes = user.op == "Cast" or (
            user.op in ("Reshape", "Transpose") and split_ref(user.input[0])[0] == node.name
        )
        found += _through_casts(consumers, user) if passes else [user]
    return found


def _only_saves(consumers, node):
    """A TF1 Saver's read: the node is a save op, or an Identity that only feeds save ops."""
    if node.op in ("SaveV2", "Save", "SaveSlices"):
        return True
    users = consumers.get(node.name, ())
    return node.op == "Identity" and bool(users) and all(_only_saves(consumers, c) for c in users)


def _weight_and_twins(files, weight):
    """The weight and its twin: Keras's export saves each variable twice, the layer's (which functions use)
    and, listed under the root's `_all_variables`, its tf.Variable (which none does), with one name and one
    value; the twin gets the folded value too, so that the saved copies agree. Nothing else is touched."""
    if files.tf1:
        return [weight]
    objects = files.meta.object_graph_def
    listed = [c.node_id for c in objects.nodes[0].children if c.local_name == "_all_variables"]
    candidates = {c.node_id for k in listed for c in objects.nodes[k].children}
    bound = {v.node_id for v in files.arg_variables.values()}
    value = files.value(weight)
    twins = [
        files.variables[k]
        for k in sorted(candidates - bound)
        if k in files.variables
        and files.variables[k].name == weight.name
        and files.variables[k].shape == weight.shape
        and np.array_equal(files.value(files.variables[k]), value)
    ]
    return [weight, *twins]
