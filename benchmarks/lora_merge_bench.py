"""Benchmark: tf_lora.lora_merge against TensorFlow's own `w + scale * tf.matmul(a, b)`, same run.

Also times a streaming pass over w (w + z with z a run-time zero: read w, write the result) as the
memory-bandwidth bound of a merge, and reports the fraction of it each merge reaches.

    .venv/bin/python benchmarks/lora_merge_bench.py [--allocator bfc] [--shapes 4096x4096x16 ...]

--allocator bfc: TensorFlow's pooling CPU allocator instead of its default one (see bench_util.py).
"""

import bench_util  # noqa: I001 - before TensorFlow: picks the allocator

import numpy as np
import tensorflow as tf

import tf_lora


@tf.function(jit_compile=False)
def tf_composition(w, a, b, scale):
    return w + scale * tf.matmul(a, b)


@tf.function(jit_compile=False)
def tf_lora_merge(w, a, b, scale):
    return tf_lora.lora_merge(w, a, b, scale)


@tf.function(jit_compile=False)
def stream_copy(w, zero):
    return w + zero


@tf.function(jit_compile=False)
def tf_assign_add(var, a, b, scale):
    var.assign_add(scale * tf.matmul(a, b))


@tf.function(jit_compile=False)
def tf_lora_merge_into_variable(var, a, b, scale):
    tf_lora.merge_into_variable(var, a, b, scale)


def bench(n_in, n_out, rank, dtype, iters, rounds):
    rng = np.random.default_rng(0)
    w = tf.constant(rng.standard_normal((n_in, n_out)), dtype)
    a = tf.constant(rng.standard_normal((n_in, rank)), dtype)
    b = tf.constant(rng.standard_normal((rank, n_out)), dtype)
    scale = tf.constant(0.5, dtype)
    zero = tf.constant(0.0, dtype)
    # Correctness first, against float64 numpy on the same (rounded) inputs. TF's composition rounds
    # a @ b to half precision before adding, so it is not the reference for half types.
    w64, a64, b64 = (t.numpy().astype(np.float64) for t in (w, a, b))
    reference = w64 + 0.5 * (a64 @ b64)
    got = tf_lora_merge(w, a, b, scale).numpy().astype(np.float64)
    rel_tol = {tf.float16: 2e-3, tf.bfloat16: 1e-2}.get(dtype, 1e-5)
    assert np.max(np.abs(got - reference) / (1 + np.abs(reference))) < rel_tol
    med = bench_util.compare(
        {
            "tf": (tf_composition, (w, a, b, scale)),
            "tf_lora": (tf_lora_merge, (w, a, b, scale)),
            "copy": (stream_copy, (w, zero)),
        },
        iters,
        rounds,
    )
    traffic = 2 * n_in * n_out * dtype.size  # read w, write the result
    print(
        f"{n_in}x{n_out} r={rank} {dtype.name:8s}  tf {med['tf'] * 1e3:7.2f} ms   "
        f"tf_lora {med['tf_lora'] * 1e3:7.2f} ms   speedup {med['tf'] / med['tf_lora']:5.2f}x   "
        f"stream bound {med['copy'] * 1e3:6.2f} ms ({traffic / med['copy'] / 1e9:5.1f} GB/s)   "
        f"tf_lora at {med['copy'] / med['tf_lora']:5.1%} of it"
    )
    # In place on a variable: the hot-swap path. Adding the update and subtracting it again keeps the
    # weight bounded over many calls; both sides do the same.
    var = tf.Variable(w)
    tf_lora.merge_into_variable(var, a, b, scale)  # the variable then owns its buffer (see the op's docs)
    med_var = bench_util.compare(
        {
            "assign_add": (tf_assign_add, (var, a, b, scale)),
            "tf_lora": (tf_lora_merge_into_variable, (var, a, b, scale)),
            "tf": (tf_composition, (w, a, b, scale)),  # the baseline, interleaved here too
        },
        iters,
        rounds,
    )
    print(
        f"{'':>{len(f'{n_in}x{n_out} r={rank} ')}}{'variable':8s}  var.assign_add(s*a@b) "
        f"{med_var['assign_add'] * 1e3:7.2f} ms   merge_into_variable {med_var['tf_lora'] * 1e3:7.2f} ms   "
        f"speedup {med_var['assign_add'] / med_var['tf_lora']:5.2f}x "
        f"({med_var['tf'] / med_var['tf_lora']:5.2f}x "
        f"w + s*a@b)   in-place bound {traffic / (traffic / med['copy']) * 1e3:6.2f} ms"
    )


def main():
    parser = bench_util.parser(__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["4096x4096x16", "4096x4096x64", "1024x1024x16"])
    parser.add_argument("--dtype", nargs="+", default=["float32"])
    args = parser.parse_args()
    bench_util.header(args)
    for dtype in args.dtype:
        for shape in args.shapes:
            n_in, n_out, rank = map(int, shape.split("x"))
            bench(n_in, n_out, rank, tf.as_dtype(dtype), args.iters, args.rounds)


if __name__ == "__main__":
    main()
