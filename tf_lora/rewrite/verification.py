"""verify: run the original and the rewritten model on the same generated inputs and compare."""

import os

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import types_pb2

from tf_lora.rewrite.errors import RewriteError, reason
from tf_lora.rewrite.model_files import ModelFiles
from tf_lora.rewrite.tf1_session import load_into


def _example(dtype, shape, rng, batch, integers=None):
    """Unknown dimensions become `batch`; floats are standard normal, integers 0 (a valid row id and adapter
    id) or drawn from `integers` ({dtype: values}, those the dtype holds), booleans False, strings empty."""
    shape = [batch] if shape is None else [batch if d is None or d < 0 else d for d in shape]
    if dtype.is_floating:
        return rng.standard_normal(shape).astype(dtype.as_numpy_dtype)
    if dtype == tf.string:
        return np.full(shape, b"", object)
    if integers is not None and dtype in integers:
        pool = np.asarray(integers[dtype], np.int64)
        pool = pool[(pool >= dtype.min) & (pool <= dtype.max)]
        if len(pool):
            return rng.choice(pool, shape).astype(dtype.as_numpy_dtype)
    return np.zeros(shape, dtype.as_numpy_dtype)


def example_inputs(function, batch=3, seed=0, integers=None):
    """Inputs for a TF2 signature function, from its specs."""
    rng = np.random.default_rng(seed)
    return {
        name: tf.constant(
            _example(
                spec.dtype,
                spec.shape.as_list() if spec.shape.rank is not None else None,
                rng,
                batch,
                integers,
            ),
            dtype=spec.dtype,
        )
        for name, spec in sorted(function.structured_input_signature[1].items())
    }


class _TF2:
    def __init__(self, path):
        try:
            self.loaded = tf.saved_model.load(str(path))
        except (OSError, ValueError, tf.errors.OpError) as e:
            raise RewriteError(f"{path}: cannot be loaded ({e})") from None
        self.signatures = sorted(self.loaded.signatures)

    def inputs(self, name, batch, seed, integers=None):
        return example_inputs(self.loaded.signatures[name], batch, seed, integers)

    def run(self, name, inputs):
        return {k: v.numpy() for k, v in self.loaded.signatures[name](**inputs).items()}


class _TF1:
    """A TF1 SavedModel or MetaGraphDef + checkpoint, run in a session through its signature_defs."""

    def __init__(self, path):
        files = ModelFiles(path)
        if files.kind == "graph_def":
            raise RewriteError(f"verify: {path} is a bare GraphDef, with no signatures to run")
        self.graph = tf.Graph()
        self.session = tf.compat.v1.Session(graph=self.graph)
        with self.graph.as_default():
            meta = load_into(files, self.session)
        self.defs = {k: v for k, v in meta.signature_def.items() if not k.startswith("__")}
        self.signatures = sorted(self.defs)

    def inputs(self, name, batch, seed, integers=None):
        rng = np.random.default_rng(seed)
        out = {}
        for key, info in sorted(self.defs[name].inputs.items()):
            shape = None if info.tensor_shape.unknown_rank else [d.size for d in info.tensor_shape.dim]
            out[key] = _example(tf.as_dtype(info.dtype), shape, rng, batch, integers)
        return out

    def run(self, name, inputs):
        sig = self.defs[name]
        feeds = {sig.inputs[k].name: v for k, v in inputs.items()}
        keys = sorted(sig.outputs)
        values = self.session.run([sig.outputs[k].name for k in keys], feed_dict=feeds)
        return dict(zip(keys, values, strict=True))


_INTEGERS = (tf.int8, tf.int16, tf.int32, tf.int64, tf.uint8, tf.uint16, tf.uint32, tf.uint64)


def _open(path):
    return _TF2(path) if ModelFiles(path).kind == "saved_model" else _TF1(path)


def verify(
    original_dir,
    rewritten_dir,
    signatures=None,
    tolerance=1e-4,
    batch=3,
    seed=0,
    expect_equal=True,
    integers=None,
) -> dict:
    """Runs both models' signatures on the same inputs and returns {signature: max |difference|}.

    Works on TF2 SavedModels, TF1 SavedModels and MetaGraphDef (.meta) files with their checkpoints; the
    rewritten MetaGraphDef is `rewritten_dir/<name>.meta`. The tolerance is relative to the outputs' size:
    a difference above `tolerance * max(1, max |output|)` raises RewriteError naming the signature and
    output. With `expect_equal=False` (a rewrite that changes the outputs on purpose, like swap-adapter) the
    difference is only reported, and the rewritten outputs must be finite. `integers`: values to draw integer
    inputs from (densify passes ids its tables kept and ids no table held); a signature that fails on them
    in the original model (an int32 input may index a dense table they do not fit) draws its int64 inputs
    alone from them, then none.
    """
    original = _open(original_dir)
    rewritten_path = rewritten_dir
    if str(original_dir).endswith((".meta", ".pb", ".pbtxt")) and os.path.isfile(original_dir):
        name = os.path.splitext(os.path.basename(str(original_dir)))[0]
        rewritten_path = os.path.join(
            rewritten_dir, name + (".meta" if str(original_dir).endswith(".meta") else ".pb")
        )
    rewritten = _open(rewritten_path)
    names = original.signatures if signatures is None else list(signatures)
    if not names:
        raise RewriteError(f"verify: {original_dir} has no signatures to run")
    unknown = [n for n in names if n not in original.signatures or n not in rewritten.signatures]
    if unknown:
        raise RewriteError(
            f"verify: no signature {unknown} in both models (original: {original.signatures}, "
            f"rewritten: {rewritten.signatures})"
        )
    differences = {}
    for name in names:
        inputs, expected = original.inputs(name, batch, seed), None
        pools = [] if integers is None else [dict.fromkeys(_INTEGERS, integers), {tf.int64: integers}]
        for pool in pools:
            probe = original.inputs(name, max(batch, 16), seed, pool)
            try:
                expected, inputs = original.run(name, probe), probe
                break
            except tf.errors.OpError:  # the ids also reach a lookup they do not fit, e.g. a dense table
                continue
        try:
            expected = original.run(name, inputs) if expected is None else expected
        except (tf.errors.OpError, ValueError, TypeError) as e:
            raise RewriteError(
                f"verify: signature {name!r} does not run on generated inputs (zeros and normal floats; its "
                f"inputs may need structure, as a ragged tensor's row splits do): {reason(e)}; check "
                "the rewrite on inputs of your own"
            ) from None
        try:
            got = rewritten.run(name, inputs)
        except (tf.errors.OpError, ValueError, TypeError) as e:
            raise RewriteError(
                f"verify: the rewritten model fails on signature {name!r}: {reason(e)}"
            ) from None
        worst = 0.0
        for key, e in expected.items():
            if key not in got:
                raise RewriteError(f"verify: signature {name!r}: the rewritten model has no output {key!r}")
            g = got[key]
            if e.shape != g.shape:
                raise RewriteError(
                    f"verify: signature {name!r} output {key!r}: shape {g.shape}, expected {e.shape}"
                )
            if e.dtype.kind not in "fc":
                diff, bound = (0.0 if np.array_equal(e, g) else float("inf")), 0.0
            elif not (
                np.array_equal(np.isfinite(e), np.isfinite(g))
                and np.array_equal(e[~np.isfinite(e)], g[~np.isfinite(g)], equal_nan=True)
            ):
                diff, bound = float("inf"), 0.0  # NaN or Inf where the other has something else
            else:
                finite = np.isfinite(e)
                diff = float(np.max(np.abs(e[finite].astype(np.float64) - g[finite]), initial=0.0))
                bound = tolerance * max(1.0, float(np.max(np.abs(e[finite]), initial=0.0)))
            if not expect_equal:
                if e.dtype.kind in "fc" and not np.all(np.isfinite(g)):
                    raise RewriteError(f"verify: signature {name!r} output {key!r} has NaN or Inf")
            elif diff > bound:
                raise RewriteError(
                    f"verify: signature {name!r} output {key!r} differs by {diff:.3g} (tolerance {bound:.3g})"
                    + _half_precision_hint(original_dir)
                )
            worst = max(worst, diff)
        differences[name] = worst
    return differences


def _half_precision_hint(model):
    """For a model whose projections compute in float16 or bfloat16 (mixed precision): the rewrite moves
    its outputs by that dtype's rounding, which the default tolerance does not allow for."""
    half = {types_pb2.DT_HALF: "float16", types_pb2.DT_BFLOAT16: "bfloat16"}
    try:
        files = ModelFiles(model)
    except RewriteError:
        return ""
    found = {
        half[node.attr["T"].type]
        for fdef in files.model_functions()
        for node in fdef.node_def
        if node.op in ("MatMul", "BatchMatMulV2", "Einsum") and node.attr["T"].type in half
    }
    if not found:
        return ""
    return (
        f"; the model computes in {' and '.join(sorted(found))}, whose rounding alone moves outputs by up to "
        "about 2e-3 (float16) or 2e-2 (bfloat16) of their size: pass such a --tolerance"
    )
