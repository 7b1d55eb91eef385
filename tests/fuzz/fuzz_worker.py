"""The fuzzer's worker: runs generated calls of every tf_lora op, one case at a time, in a process that may
die.

Protocol (test_fuzz_ops.py drives it): the worker prints `READY <json list of op names>`, then for each case
index read from stdin prints one line `RESULT <json>`: {"case", "op", "mode", "outcome", "problem"}. outcome
is "accepted" or "refused" (an error raised, as bad input should be); problem is null, or what was wrong
(a wrong value, a refused call that changed a table or variable). A crash or a hang is seen by the parent as
the worker dying or not answering.

Cases are pure functions of (seed, index), so one is replayed alone with
    python tests/fuzz/fuzz_worker.py --seed SEED --case INDEX
which prints the case and its result.

What a case is: an op (round robin over every op of every gen_*_ops module), a mode (eager, tf.function with
static shapes, tf.function with unknown shapes), a value per symbolic dimension of the op's template (small,
zero, or huge: 2^31 .. 2^63-1, kept only where the tensor stays empty), attrs at their edges (dim 2^63-1,
NaN floats, every allowed string), values with NaN/inf now and then, ids out of range, resource handles that
are right, of the wrong kind, destroyed, or empty ([0]), and a mutation (a dimension changed, a rank
dropped or added) in some cases.
"""

import argparse
import json
import math
import os
import pkgutil
import sys
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from fuzz_templates import TEMPLATES  # noqa: E402
from tensorflow.python.framework import op_def_registry  # noqa: E402
from tensorflow.python.ops import gen_resource_variable_ops, resource_variable_ops  # noqa: E402

import tf_lora.python.ops as ops_package  # noqa: E402

HUGE = [2**31, 2**31 + 1, 2**40, 2**61, 2**62, 2**63 - 1]
SMALL = [0, 0, 0, 1, 1, 2, 3, 4, 5, 8, 16, 17, 33]
MAX_ELEMENTS = 1 << 15  # per tensor: keeps a case to milliseconds
FLOAT_ATTRS = [0.0, 0.1, 0.5, 1.0, -1.0, 0.9, 0.999, 1e-7, 1e30, math.nan, math.inf, -math.inf]
INT_ATTRS = [0, 1, 2, 3, 4, 8, -1, 2**20, 2**20 + 1, 2**31, 2**62, 2**63 - 1, -(2**63)]
INT64_VALUES = [0, 1, 2, 3, 5, 7, -1, -5, 2**31, 2**62, 2**63 - 1, -(2**63)]
MODES = ["eager", "function", "unknown_shapes"]
FLOATS = {tf.float16, tf.bfloat16, tf.float32, tf.float64}
# Relative error allowed against the float64 reference, scaled by the sum of |terms| of each output.
TOLERANCE = {tf.float16: 4e-3, tf.bfloat16: 3e-2, tf.float32: 1e-5, tf.float64: 1e-12}


def registered_ops():
    """{op name: generated wrapper} for every op of every gen_*_ops module of tf_lora.python.ops."""
    found = {}
    for info in pkgutil.iter_modules(ops_package.__path__):
        if not (info.name.startswith("gen_") and info.name.endswith("_ops")):
            continue
        module = __import__(f"tf_lora.python.ops.{info.name}", fromlist=["_"])
        for attr in dir(module):
            if attr.startswith("TfLora_"):
                found["TfLora>" + attr[len("TfLora_") :]] = getattr(module, attr)
    return dict(sorted(found.items()))


class Case:
    """One generated call: everything drawn from rng before anything runs."""

    def __init__(self, seed, index, ops):
        self.rng = rng = np.random.default_rng([seed, index])
        names = list(ops)
        self.index = index
        self.op = names[index % len(names)]
        self.wrapper = ops[self.op]
        self.op_def = op_def_registry.get(self.op)
        self.mode = MODES[(index // len(names)) % len(MODES)]
        template = TEMPLATES.get(self.op.split(">", 1)[1], {})
        self.dims = self._draw_dims(template)
        self.attrs = self._draw_attrs(template)
        self.dtype = self._draw_type()
        self.inputs = {}
        counts = {}  # list inputs: one length per length attr
        for arg in self.op_def.input_arg:
            spec = template.get(arg.name)
            self.inputs[arg.name] = self._draw_input(arg, spec, template.get("values:" + arg.name))
            if arg.number_attr:
                count = counts.setdefault(arg.number_attr, int(self.rng.integers(2)))
                self.inputs[arg.name]["count"] = count
        if rng.random() < 0.15:
            self._mutate()

    # Drawing.
    def _draw_dims(self, template):
        outputs = [spec for key, spec in template.items() if key.startswith("output:")]
        specs = [
            spec
            for key, spec in template.items()
            if isinstance(spec, tuple) and not key.startswith("output:")
        ]
        symbols = {s for spec in specs for s in spec if isinstance(s, str) and s != "*"}
        symbols = sorted(symbols | {v for k, v in template.items() if k.startswith("attr:")})
        for _ in range(30):
            dims = {s: int(self.rng.choice(SMALL)) for s in symbols}
            for s in symbols:
                if self.rng.random() < 0.15:
                    dims[s] = int(self.rng.choice(HUGE))
            dims["*"] = [int(self.rng.choice([0, 1, 2, 3, 5])) for _ in range(int(self.rng.integers(0, 3)))]
            # The table a case makes: its optimizer, and (mostly) the slot width it really has.
            dims["optimizer"] = str(self.rng.choice(["sgd", "adagrad", "adam", "ftrl"]))
            if "S" in dims and self.rng.random() < 0.7:
                dims["S"] = dims.get("D", 1) * {"sgd": 0, "adagrad": 1}.get(dims["optimizer"], 2)
            if "N" in dims and self.rng.random() < 0.04:
                # Many rows, narrow ones: past the gradient's 1,024-row shards and the threshold where the
                # kernels' parallel loops use more than one thread, which small cases never reach.
                dims["N"] = int(self.rng.choice([1025, 2049, 4100]))
                for s in ("in", "out", "r"):
                    dims[s] = min(dims.get(s, 1), 7)
            if all(self._fits(spec, dims) for spec in specs) and all(
                self._allocatable(spec, dims) for spec in outputs
            ):
                return dims
        return {s: 2 for s in symbols} | {"*": [2], "optimizer": "sgd"}

    @staticmethod
    def _shape(spec, dims):
        shape = []
        for s in spec:
            if s == "*":
                shape.extend(dims["*"])
            elif isinstance(s, str):
                shape.append(dims[s])
            else:
                shape.append(s)
        return shape

    def _allocatable(self, spec, dims):
        """An output of these dimensions either fits in memory or cannot be a shape (a clean refusal)."""
        size = math.prod(self._shape(spec, dims))
        return size <= MAX_ELEMENTS or size >= 2**63

    def _fits(self, spec, dims):
        shape = self._shape(spec, dims)
        if 0 in shape:
            nonzero = [d for d in shape if d]
            return math.prod(nonzero) < 2**62  # TensorFlow's own bound on any shape
        return math.prod(shape) <= MAX_ELEMENTS

    def _draw_attrs(self, template):
        attrs = {}
        inferred = {arg.number_attr for arg in self.op_def.input_arg}  # from list inputs' lengths
        for attr in self.op_def.attr:
            if attr.type == "type" or attr.name in inferred:
                continue
            if attr.HasField("default_value") and self.rng.random() < 0.4:
                continue
            hint = template.get("attr:" + attr.name)
            if isinstance(hint, str) and hint in self.dims and self.rng.random() < 0.85:
                attrs[attr.name] = max(self.dims[hint], 1)  # the attr that must agree with a dimension
            elif attr.type == "int":
                attrs[attr.name] = int(self.rng.choice(INT_ATTRS))
            elif attr.type == "float":
                attrs[attr.name] = float(self.rng.choice(FLOAT_ATTRS))
            elif attr.type == "bool":
                attrs[attr.name] = bool(self.rng.random() < 0.5)
            elif attr.type == "string":
                allowed = list(attr.allowed_values.list.s)
                if allowed and self.rng.random() < 0.95:
                    attrs[attr.name] = self.rng.choice(allowed).decode()
                elif attr.name == "shared_name":
                    attrs[attr.name] = str(
                        self.rng.choice(["", "shared_a", "shared_b", f"case_{self.index}"])
                    )
                else:
                    attrs[attr.name] = str(self.rng.choice(["", "x", "zeros", "nope"]))
        return attrs

    def _draw_type(self):
        for attr in self.op_def.attr:
            if attr.type == "type":
                allowed = [tf.as_dtype(t) for t in attr.allowed_values.list.type] or sorted(FLOATS, key=str)
                return allowed[int(self.rng.integers(len(allowed)))]
        return None

    def _draw_input(self, arg, spec, values):
        if arg.type == tf.resource.as_datatype_enum:
            kinds = ["right"] * 6 + ["wrong_kind", "destroyed", "empty", "uninitialized"]
            return {"resource": spec or "table", "variant": str(self.rng.choice(kinds))}
        dtype = tf.as_dtype(arg.type) if arg.type else self.dtype
        if isinstance(spec, tuple):
            shape = self._shape(spec, self.dims)
        else:  # no template: a random rank of small dimensions
            shape = [int(self.rng.choice([0, 1, 2, 3])) for _ in range(int(self.rng.integers(0, 4)))]
        return {"dtype": dtype, "shape": shape, "values": values}

    def _mutate(self):
        tensors = [name for name, t in self.inputs.items() if "shape" in t]
        if not tensors:
            return
        t = self.inputs[tensors[int(self.rng.integers(len(tensors)))]]
        how = self.rng.integers(3)
        if how == 0 and t["shape"]:
            t["shape"][int(self.rng.integers(len(t["shape"])))] = int(self.rng.choice(SMALL + [2**62]))
        elif how == 1 and t["shape"]:
            t["shape"].pop()
        else:
            t["shape"].append(int(self.rng.choice([0, 1, 2])))
        if not self._fits(tuple(t["shape"]), {"*": []}):
            t["shape"] = [min(d, 3) for d in t["shape"]]

    def describe(self):
        inputs = {
            k: (
                v
                if "resource" in v
                else {"dtype": v["dtype"].name, "shape": v["shape"]}
                | ({"count": v["count"]} if "count" in v else {})
            )
            for k, v in self.inputs.items()
        }
        return {"op": self.op, "mode": self.mode, "attrs": self.attrs, "inputs": inputs}

    # Values.
    def tensor(self, name):
        t = self.inputs[name]
        dtype, shape, kind = t["dtype"], t["shape"], t["values"]
        n = math.prod(shape)
        if n == 0:
            return tf.zeros(shape, dtype)
        rng = self.rng
        if dtype.is_floating:
            values = rng.normal(size=n)
            if kind == "scale" and rng.random() < 0.5:
                values = rng.choice([0.0, 1.0, 2.0, -0.5], size=n)
            if kind == "nonnegative" and rng.random() < 0.9:
                values = np.abs(values)
            if rng.random() < 0.08:
                values[rng.integers(n)] = rng.choice([math.nan, math.inf, -math.inf, 1e30])
            return tf.constant(values.reshape(shape), dtype)
        if kind == "adapter_ids":
            adapters = self.dims.get("n", 1)
            values = rng.integers(-1, max(adapters, 1), size=n)
            if rng.random() < 0.1:
                values[rng.integers(n)] = rng.choice([-2, adapters, adapters + 1, 2**31 - 1, -(2**31)])
            return tf.constant(values.reshape(shape), dtype)
        if kind == "counts":
            values = rng.integers(0, 100, size=n)
            if rng.random() < 0.1:
                values[rng.integers(n)] = rng.choice(INT64_VALUES)
            return tf.constant(values.reshape(shape), dtype)
        if kind == "ids":
            values = rng.integers(0, 20, size=n)
            if rng.random() < 0.2:
                values[rng.integers(n)] = rng.choice(INT64_VALUES)
            return tf.constant(values.reshape(shape), dtype)
        return tf.constant(rng.choice(INT64_VALUES, size=n).reshape(shape), dtype)


class Resources:
    """The tables and variables a case's resource inputs point at, with a reader of each one's state."""

    def __init__(self, case):
        self.case = case
        self.keep = []  # owners of handles that must outlive the call

    def table(self):
        rng, dims = self.case.rng, self.case.dims
        dim = max(1, min(dims.get("D", 2), 64))
        if rng.random() < 0.05:  # rows too wide to hold: the table must be refused, never made
            handle = make_table(
                int(rng.choice([2**20 + 1, 2**62, 2**63 - 1])), dims["optimizer"], f"w{self.case.index}"
            )
            return handle, lambda: export(handle)
        handle = make_table(dim, dims["optimizer"], f"res_{self.case.index}")
        ids = tf.constant(rng.integers(0, 20, size=int(rng.integers(0, 6))), tf.int64)
        grads = tf.constant(rng.normal(size=[ids.shape[0], dim]), tf.float32)
        gen("SparseTablePush")(table=handle, ids=ids, grads=grads, learning_rate=0.1)
        return handle, lambda: export(handle)

    def variable(self, right):
        dims, dtype = self.case.dims, self.case.dtype or tf.float32
        shape = [min(dims.get("in", 2), 64), min(dims.get("out", 2), 64)] if right else [3]
        if not right and self.case.rng.random() < 0.5:
            dtype = tf.int32
        var = tf.Variable(tf.cast(self.case.rng.normal(size=shape), dtype))
        self.keep.append(var)
        return var.handle, lambda: [var.numpy()]

    def handle(self, spec):
        """(handle, reader): reader() is the resource's state, None where it cannot be read."""
        kind, variant = spec["resource"], spec["variant"]
        if variant == "uninitialized":
            var = resource_variable_ops.UninitializedVariable(
                shape=[2, 2], dtype=self.case.dtype or tf.float32
            )
            self.keep.append(var)
            return var.handle, lambda: None
        if variant == "wrong_kind":
            return self.variable(right=False) if kind == "table" else self.table()
        handle, reader = self.table() if kind == "table" else self.variable(right=True)
        if variant == "destroyed":
            gen_resource_variable_ops.destroy_resource_op(handle, ignore_lookup_error=True)
        return handle, reader


def gen(op):
    return OPS["TfLora>" + op]


def make_table(dim, optimizer, name):
    return gen("SparseTable")(
        dim=dim, initializer="uniform", init_a=-1.0, init_b=1.0, optimizer=optimizer, shared_name=name
    )


def read(reader):
    try:
        return reader()
    except (tf.errors.OpError, ValueError, TypeError):
        return None


def export(handle):
    """The table's contents sorted by key, and its step."""
    keys, values, slots, counts, steps, step = gen("SparseTableExport")(table=handle)
    order = np.argsort(keys.numpy(), kind="stable")
    return [t.numpy()[order] for t in (keys, values, slots, counts, steps)] + [int(step)]


def same(a, b):
    if a is None or b is None:
        return a is None and b is None
    return len(a) == len(b) and all(np.array_equal(x, y, equal_nan=True) for x, y in zip(a, b, strict=True))


def run_case(case):
    """Runs the case; returns (outcome, problem)."""
    resources = Resources(case)
    args, handles, readers = {}, {}, {}
    try:
        for name, spec in case.inputs.items():
            if "resource" in spec:
                handles[name], readers[name] = resources.handle(spec)
            elif "count" in spec:  # a list input
                args[name] = [case.tensor(name) for _ in range(spec["count"])]
            else:
                args[name] = case.tensor(name)
    except (tf.errors.OpError, ValueError, TypeError) as e:
        return "setup_refused", None if not os.environ.get("FUZZ_DEBUG") else f"(debug) {e}"[-600:]
    before = {name: read(reader) for name, reader in readers.items()}
    empty = {name for name, spec in case.inputs.items() if "resource" in spec and spec["variant"] == "empty"}
    names = [arg.name for arg in case.op_def.input_arg]

    def call(*tensors):
        kwargs = dict(zip(names, tensors, strict=True))
        for name in empty:
            kwargs[name] = tf.stack([kwargs[name]])[:0]
        result = case.wrapper(**kwargs, **case.attrs)
        if result is None or isinstance(result, tf.Operation):
            return []
        return list(result) if isinstance(result, (tuple, list)) else [result]

    inputs = [handles[n] if n in handles else args[n] for n in names]
    try:
        if case.mode == "eager" and not empty:
            outputs = call(*inputs)
        elif case.mode == "unknown_shapes" or empty:
            signature = [tf.nest.map_structure(lambda t: tf.TensorSpec(None, t.dtype), t) for t in inputs]
            outputs = tf.function(call, input_signature=signature)(*inputs)
        else:
            outputs = tf.function(call)(*inputs)
    except (tf.errors.OpError, ValueError, TypeError) as e:
        if isinstance(e, tf.errors.InternalError):
            return "refused", f"InternalError (a bug, not an answer to bad input): {e}"[:500]
        for name, reader in readers.items():
            if not same(before[name], read(reader)):
                return "refused", f"a refused call changed {name}: {type(e).__name__}: {e}"[:500]
        return "refused", None if not os.environ.get("FUZZ_DEBUG") else f"(debug) {e}"[-600:]
    check = CHECKS.get(case.op.split(">", 1)[1])
    problem = check(case, args, readers, before, outputs) if check else None
    return "accepted", problem


# Checks of accepted calls against independent references.
def _ref_close(case, got, want, scale, what):
    tol = TOLERANCE.get(case.dtype, 1e-5)
    if int(tf.size(got)) == 0:  # may have dimensions numpy cannot hold; the shape checks were TensorFlow's
        return None if want.size == 0 else f"{what}: empty, expected {want.shape}"
    got = _f64(got)
    if got.shape != want.shape:
        return f"{what}: shape {got.shape}, expected {want.shape}"
    # Where the terms' magnitudes pass the dtype's largest value, overflow to inf is the right answer.
    finite = np.isfinite(scale) & (scale < 0.5 * float(case.dtype.max))
    # Not "<=" is also true where got is NaN and the answer is not: a kernel returning NaN fails.
    bad = finite & ~(np.abs(got - want) <= tol * (scale + 1e-30) + tol)
    if bad.any():
        i = np.argwhere(bad)[0]
        return f"{what}{i.tolist()}: {got[tuple(i)]}, expected {want[tuple(i)]}"
    return None


def _f64(t):
    """t in float64; an empty t with dimensions numpy cannot hold (2^62) as the same math: those become 0."""
    if int(tf.size(t)) == 0:
        return np.zeros([d if d < 2**31 else 0 for d in t.shape.as_list()])
    return np.asarray(tf.cast(t, tf.float64).numpy())


def check_merge(case, args, readers, before, outputs):
    a, b, s = _f64(args["a"]), _f64(args["b"]), float(_f64(args["scale"]))
    if "var" in readers:
        w = tf.cast(before["var"][0], tf.float64).numpy()
        got = readers["var"]()[0]
    else:
        w, got = _f64(args["w"]), outputs[0]
    want = w + s * a @ b
    return _ref_close(case, got, want, np.abs(w) + abs(s) * np.abs(a) @ np.abs(b), "merged")


def check_apply(case, args, readers, before, outputs):
    y, x, a, b, s = (_f64(args[k]) for k in ("y", "x", "a", "b", "scale"))
    want = y + s * (x @ a) @ b
    problem = _ref_close(
        case, outputs[0], want, np.abs(y) + abs(s) * (np.abs(x) @ np.abs(a)) @ np.abs(b), "y"
    )
    return problem or _check_xa(case, args, "a", outputs[1], lambda: (x @ a, np.abs(x) @ np.abs(a)))


def _check_xa(case, args, a_name, got, reference):
    """(Batched)LoraApply's x @ a output against reference() = (want, scale); with no input columns, zeros
    [N, r], which may be more than numpy should hold (checked with no [N, r]-sized temporary)."""
    if args["x"].shape[1] == 0:
        want = (args["x"].shape[0], args[a_name].shape[-1])
        extremes = [float(f(got)) for f in (tf.reduce_min, tf.reduce_max)] if all(want) else [0, 0]
        return None if got.shape == want and extremes == [0, 0] else f"xa: {got.shape}, not zeros {want}"
    return _ref_close(case, got, *reference(), "xa")


def _batched(args, lead):
    g, x, a, b, s = (_f64(args[k]) for k in (lead, "x", "a_stack", "b_stack", "scales"))
    ids = args["adapter_ids"].numpy() if int(tf.size(args["adapter_ids"])) else np.zeros([0], np.int32)
    return g, x, a, b, s, ids


def check_batched_apply(case, args, readers, before, outputs):
    y, x, a, b, s, ids = _batched(args, "y")
    want, scale = y.copy(), np.abs(y)
    for i, k in enumerate(ids):
        if k >= 0:
            want[i] += s[k] * (x[i] @ a[k]) @ b[k]
            scale[i] += abs(s[k]) * (np.abs(x[i]) @ np.abs(a[k])) @ np.abs(b[k])

    def xa_reference():
        xa, xa_scale = np.zeros((len(ids), a.shape[2])), np.zeros((len(ids), a.shape[2]))
        for i, k in enumerate(ids):
            if k >= 0:
                xa[i], xa_scale[i] = x[i] @ a[k], np.abs(x[i]) @ np.abs(a[k])
        return xa, xa_scale

    problem = _ref_close(case, outputs[0], want, scale, "y")
    return problem or _check_xa(case, args, "a_stack", outputs[1], xa_reference)


def _grad_ref(g, x, a, b, s, xa=None, grad_xa=0.0):
    """xa: LoraApply's x @ a as given (None: computed); grad_xa: the gradient for it."""
    gbt = g @ b.T
    xa = x @ a if xa is None else xa
    u = s * gbt + grad_xa
    return u @ a.T, x.T @ u, s * xa.T @ g, np.sum(xa * gbt)


def check_apply_grad(case, args, readers, before, outputs):
    g, x, a, b, s = (_f64(args[k]) for k in ("grad", "x", "a", "b", "scale"))
    xa, grad_xa, xa_scale, grad_xa_scale = None, 0.0, None, 0.0
    if args["xa"]:  # saved = 1: float types use the given x @ a (half types compute it; in = 0: it is 0)
        grad_xa = _f64(args["grad_xa"][0])
        grad_xa_scale = np.abs(grad_xa)
        if case.dtype in (tf.float32, tf.float64):
            xa = _f64(args["xa"][0]) if x.shape[1] else np.zeros_like(grad_xa)
            xa_scale = np.abs(xa)
    for name, got, want, scale in zip(
        ("dx", "da", "db", "dscale"),
        outputs,
        _grad_ref(g, x, a, b, s, xa, grad_xa),
        _grad_ref(np.abs(g), np.abs(x), np.abs(a), np.abs(b), abs(s), xa_scale, grad_xa_scale),
        strict=True,
    ):
        problem = _ref_close(case, got, np.asarray(want), np.asarray(scale), name)
        if problem:
            return problem
    return None


def check_batched_apply_grad(case, args, readers, before, outputs):
    g, x, a, b, s, ids = _batched(args, "grad")
    want = [np.zeros_like(x), np.zeros_like(a), np.zeros_like(b), np.zeros_like(s)]
    scale = [np.zeros_like(x), np.zeros_like(a), np.zeros_like(b), np.zeros_like(s)]
    saved = bool(args["xa"])  # as check_apply_grad's, per adapter's rows
    grad_xa = _f64(args["grad_xa"][0]) if saved else None
    given = None
    if saved and case.dtype in (tf.float32, tf.float64):
        given = _f64(args["xa"][0]) if x.shape[1] else np.zeros_like(grad_xa)
    for k in range(a.shape[0]):
        rows = ids == k
        given_k = None if given is None else given[rows]
        grad_k = 0.0 if grad_xa is None else grad_xa[rows]
        dx, da, db, ds = _grad_ref(g[rows], x[rows], a[k], b[k], s[k], given_k, grad_k)
        want[0][rows], want[1][k], want[2][k], want[3][k] = dx, da, db, ds
        abs_given = None if given_k is None else np.abs(given_k)
        dx, da, db, ds = _grad_ref(
            np.abs(g[rows]), np.abs(x[rows]), np.abs(a[k]), np.abs(b[k]), abs(s[k]), abs_given, np.abs(grad_k)
        )
        scale[0][rows], scale[1][k], scale[2][k], scale[3][k] = dx, da, db, ds
    for name, got, w, sc in zip(("dx", "da", "db", "dscales"), outputs, want, scale, strict=True):
        problem = _ref_close(case, got, w, sc, name)
        if problem:
            return problem
    return None


def check_pull(case, args, readers, before, outputs):
    after = readers["table"]()
    rows = dict(zip(after[0].tolist(), after[1], strict=True))
    ids = args["ids"].numpy().reshape(-1)
    got = outputs[0].numpy().reshape(len(ids), outputs[0].shape[-1])
    for i, key in enumerate(ids.tolist()):
        want = rows.get(key, np.zeros(got.shape[1], np.float32))
        if not np.array_equal(got[i], want, equal_nan=True):
            return f"pulled row of id {key} is not the table's row"
    if not case.attrs.get("training", False) and len(after[0]) != len(before["table"][0]):
        return "an inference pull changed the number of keys"
    return None


def check_size(case, args, readers, before, outputs):
    return None if int(outputs[0]) == len(before["table"][0]) else "size differs from the exported keys"


def check_push(case, args, readers, before, outputs):
    if int(outputs[0]) != before["table"][5] + 1:
        return f"push returned step {int(outputs[0])} after step {before['table'][5]}"
    return None


def check_import(case, args, readers, before, outputs):
    after = readers["table"]()
    order = np.argsort(args["keys"].numpy(), kind="stable")
    want = [args[k].numpy()[order] for k in ("keys", "values", "slots", "update_counts", "last_steps")]
    return (
        None
        if same(after[:5], want) and after[5] == int(args["step"])
        else "the table differs from what was imported"
    )


def check_remove(case, args, readers, before, outputs):
    present = set(before["table"][0].tolist()) & set(args["ids"].numpy().reshape(-1).tolist())
    after = set(readers["table"]()[0].tolist())
    if int(outputs[0]) != len(present) or present & after:
        return f"remove returned {int(outputs[0])} for {len(present)} present ids"
    return None


def check_evict(case, args, readers, before, outputs):
    gone = len(before["table"][0]) - len(readers["table"]()[0])
    return (
        None if int(outputs[0]) == gone else f"evict returned {int(outputs[0])}, the table lost {gone} keys"
    )


CHECKS = {
    "LoraMerge": check_merge,
    "ResourceLoraMerge": check_merge,
    "LoraApply": check_apply,
    "BatchedLoraApply": check_batched_apply,
    "LoraApplyGrad": check_apply_grad,
    "BatchedLoraApplyGrad": check_batched_apply_grad,
    "SparseTablePull": check_pull,
    "SparseTableSize": check_size,
    "SparseTablePush": check_push,
    "SparseTableImport": check_import,
    "SparseTableRemove": check_remove,
    "SparseTableEvict": check_evict,
}

OPS = registered_ops()


def answer(seed, index):
    case = Case(seed, index, OPS)
    try:
        outcome, problem = run_case(case)
    except Exception:  # noqa: BLE001 - the fuzzer's own failure, reported as one
        outcome, problem = "fuzzer_error", traceback.format_exc()[-1500:]
    return {"case": index, "op": case.op, "mode": case.mode, "outcome": outcome, "problem": problem}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--case", type=int, help="replay one case and print it")
    flags = parser.parse_args()
    if flags.case is not None:
        print(json.dumps(Case(flags.seed, flags.case, OPS).describe(), default=str, indent=1))
        print(json.dumps(answer(flags.seed, flags.case)))
        return
    print(
        "READY "
        + json.dumps(list(OPS) + ["missing:" + op for op in OPS if op.split(">")[1] not in TEMPLATES])
    )
    sys.stdout.flush()
    for line in sys.stdin:
        print("RESULT " + json.dumps(answer(flags.seed, int(line))))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
