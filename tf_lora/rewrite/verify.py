"""verify: run the original and the rewritten SavedModel on the same generated inputs and compare."""

import numpy as np
import tensorflow as tf

from tf_lora.rewrite.saved_model import RewriteError


def example_inputs(function, batch=3, seed=0):
    """Inputs for a signature function from its specs: unknown dimensions become `batch`; floats are
    standard normal, integers 0 (a valid row id and adapter id), booleans False, strings empty."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for name, spec in sorted(function.structured_input_signature[1].items()):
        shape = (
            [batch if d is None else d for d in spec.shape.as_list()]
            if spec.shape.rank is not None
            else [batch]
        )
        if spec.dtype.is_floating:
            value = rng.standard_normal(shape).astype(spec.dtype.as_numpy_dtype)
        elif spec.dtype == tf.string:
            value = np.full(shape, b"", object)
        else:
            value = np.zeros(shape, spec.dtype.as_numpy_dtype)
        inputs[name] = tf.constant(value, dtype=spec.dtype)
    return inputs


def _load(path):
    try:
        return tf.saved_model.load(str(path))
    except (OSError, ValueError, tf.errors.OpError) as e:
        raise RewriteError(f"{path}: cannot be loaded ({e})") from None


def verify(
    original_dir, rewritten_dir, signatures=None, tolerance=1e-4, batch=3, seed=0, expect_equal=True
) -> dict:
    """Runs both models' signatures on the same inputs and returns {signature: max |difference|}.

    The tolerance is relative to the outputs' size: a difference above `tolerance * max(1, max |output|)`
    raises RewriteError naming the signature and output. With `expect_equal=False` (a rewrite that changes
    the outputs on purpose, like swap-adapter) the difference is only reported, and the rewritten outputs
    must be finite.
    """
    original, rewritten = _load(original_dir), _load(rewritten_dir)
    names = sorted(original.signatures) if signatures is None else list(signatures)
    unknown = [n for n in names if n not in original.signatures or n not in rewritten.signatures]
    if unknown:
        raise RewriteError(
            f"verify: no signature {unknown} in both models (original: {sorted(original.signatures)}, "
            f"rewritten: {sorted(rewritten.signatures)})"
        )
    differences = {}
    for name in names:
        inputs = example_inputs(original.signatures[name], batch, seed)
        expected, got = original.signatures[name](**inputs), rewritten.signatures[name](**inputs)
        worst = 0.0
        for key, value in expected.items():
            e, g = value.numpy(), got[key].numpy()
            if e.shape != g.shape:
                raise RewriteError(
                    f"verify: signature {name!r} output {key!r}: shape {g.shape}, expected {e.shape}"
                )
            if e.dtype.kind not in "fc":
                diff = 0.0 if np.array_equal(e, g) else float("inf")
                bound = 0.0
            else:
                diff = float(np.max(np.abs(e.astype(np.float64) - g), initial=0.0))
                bound = tolerance * max(1.0, float(np.max(np.abs(e), initial=0.0)))
            if not expect_equal:
                if e.dtype.kind in "fc" and not np.all(np.isfinite(g)):
                    raise RewriteError(f"verify: signature {name!r} output {key!r} has NaN or Inf")
            elif diff > bound:
                raise RewriteError(
                    f"verify: signature {name!r} output {key!r} differs by {diff:.3g} (tolerance {bound:.3g})"
                )
            worst = max(worst, diff)
        differences[name] = worst
    return differences
