"""Benchmark: tf_lora's LoRA layer ops against TensorFlow compositions of the same math, same run.

decode   lora_matmul(x, w, a, b, s) and x @ w + s * (x @ a) @ b, each against plain tf.matmul(x, w)
apply    lora_apply(y, x, a, b, s) against y + s * tf.matmul(tf.matmul(x, a), b), with the fraction of
         the memory-traffic bound (read x and y, write y; bandwidth from a streaming pass measured here)
fwd+bwd  lora_apply forward and gradients for x, a, b from an upstream gradient (the layer's share of a
         training step), against autodiff through the composition; "+loss" adds a loss on the output

  .venv/bin/python benchmarks/lora_apply_bench.py [--allocator bfc] [--in 4096 --out 4096 --rank 16]
"""

import bench_util  # noqa: I001 - before TensorFlow: picks the allocator

import numpy as np
import tensorflow as tf

import tf_lora


@tf.function(jit_compile=False)
def plain_matmul(x, w, *unused):
    # Takes (and ignores) the adapter arguments too: every candidate pays the same Python call
    # overhead, which at decode sizes is as large as the LoRA work (each argument of a tf.function
    # call costs tens of microseconds here).
    del unused
    return tf.matmul(x, w)


@tf.function(jit_compile=False)
def lora_matmul(x, w, a, b, s):
    return tf_lora.lora_matmul(x, w, a, b, s)


@tf.function(jit_compile=False)
def composed_matmul(x, w, a, b, s):
    return tf.matmul(x, w) + s * tf.matmul(tf.matmul(x, a), b)


@tf.function(jit_compile=False)
def lora_apply(y, x, a, b, s):
    return tf_lora.lora_apply(y, x, a, b, s)


@tf.function(jit_compile=False)
def composed_apply(y, x, a, b, s):
    return y + s * tf.matmul(tf.matmul(x, a), b)


@tf.function(jit_compile=False)
def stream_copy(y, zero):
    return y + zero


def _fwd_bwd(apply, loss=False):
    """The layer's share of a training step: its forward, and gradients for x, a and b from the upstream
    gradient g, as the layer after it would hand it down. Returning the output keeps the forward alive
    (TensorFlow prunes a forward whose output nothing reads; LoraApply's gradient needs only its inputs).

    With `loss`, the step also computes loss = sum(output * g) and differentiates that instead: the
    gradient reaching the layer is again g, but the loss's multiply, sum and their gradients (four more
    passes over [N, out]) are timed too, on both sides alike."""

    @tf.function(jit_compile=False)
    def step(y, x, a, b, s, g):
        with tf.GradientTape() as tape:
            tape.watch([x, a, b])
            out = apply(y, x, a, b, s)
            if loss:
                out = tf.reduce_sum(out * g)
        return [out] + tape.gradient(out, [x, a, b], output_gradients=None if loss else g)

    return step


def _tensors(rng, dtype, *shapes):
    return [tf.constant(rng.standard_normal(s) * 0.1, dtype) for s in shapes]


def decode(n, n_in, n_out, rank, args):
    rng = np.random.default_rng(n)
    x, w, a, b = _tensors(rng, tf.float32, (n, n_in), (n_in, n_out), (n_in, rank), (rank, n_out))
    s = tf.constant(2.0)
    np.testing.assert_allclose(
        lora_matmul(x, w, a, b, s), composed_matmul(x, w, a, b, s), rtol=1e-4, atol=1e-4
    )
    med = bench_util.compare(
        {
            "matmul": (plain_matmul, (x, w, a, b, s)),
            "tf_lora": (lora_matmul, (x, w, a, b, s)),
            "composed": (composed_matmul, (x, w, a, b, s)),
        },
        args.iters * 3,
        args.rounds,
    )
    ms = {k: v * 1e3 for k, v in med.items()}
    print(
        f"decode  N={n:<5d} tf.matmul {ms['matmul']:6.3f} ms   lora_matmul {ms['tf_lora']:6.3f} ms "
        f"({med['tf_lora'] / med['matmul']:.3f}x matmul)   composition {ms['composed']:6.3f} ms "
        f"({med['composed'] / med['matmul']:.3f}x matmul)"
    )


def apply(n, n_in, n_out, rank, args):
    rng = np.random.default_rng(1)
    y, x, a, b, g = _tensors(rng, tf.float32, (n, n_out), (n, n_in), (n_in, rank), (rank, n_out), (n, n_out))
    s = tf.constant(2.0)
    np.testing.assert_allclose(lora_apply(y, x, a, b, s), composed_apply(y, x, a, b, s), rtol=1e-4, atol=1e-4)
    med = bench_util.compare(
        {
            "tf": (composed_apply, (y, x, a, b, s)),
            "tf_lora": (lora_apply, (y, x, a, b, s)),
            "copy": (stream_copy, (y, tf.constant(0.0))),
        },
        args.iters,
        args.rounds,
    )
    bandwidth = 2 * n * n_out * 4 / med["copy"]  # bytes/s of a read + write streaming pass
    bound = (n * n_in + 2 * n * n_out) * 4 / bandwidth  # read x, read y, write y
    flops = 2 * 2 * n * rank * (n_in + n_out)
    ms = {k: v * 1e3 for k, v in med.items()}
    print(
        f"apply   N={n:<5d} composition {ms['tf']:7.2f} ms   lora_apply {ms['tf_lora']:7.2f} ms   "
        f"speedup {med['tf'] / med['tf_lora']:.2f}x   traffic bound {bound * 1e3:.2f} ms "
        f"({bandwidth / 1e9:.1f} GB/s): {bound / med['tf_lora']:.0%} of it; "
        f"{flops / med['tf_lora'] / 1e9:.0f} GFLOP/s"
    )

    candidates = {}
    for loss in (False, True):
        ours = _fwd_bwd(tf_lora.lora_apply, loss)
        theirs = _fwd_bwd(lambda y, x, a, b, s: y + s * (x @ a) @ b, loss)
        for got, expected in zip(ours(y, x, a, b, s, g), theirs(y, x, a, b, s, g), strict=True):
            np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-3)
        suffix = "+loss" if loss else ""
        candidates[f"tf{suffix}"] = (theirs, (y, x, a, b, s, g))
        candidates[f"tf_lora{suffix}"] = (ours, (y, x, a, b, s, g))
    med = bench_util.compare(candidates, args.iters, args.rounds)
    for suffix in ("", "+loss"):
        tf_ms, ours_ms = med[f"tf{suffix}"] * 1e3, med[f"tf_lora{suffix}"] * 1e3
        print(
            f"fwd+bwd{suffix:<5s} N={n:<5d} autodiff {tf_ms:7.2f} ms   lora_apply {ours_ms:7.2f} ms   "
            f"speedup {tf_ms / ours_ms:.2f}x"
        )


@tf.function(jit_compile=False)
def batched_lora_matmul(x, w, a_stack, b_stack, ids, scales):
    return tf_lora.batched_lora_matmul(x, w, a_stack, b_stack, ids, scales)


@tf.function(jit_compile=False)
def gather_einsum(x, w, a_stack, b_stack, ids, scales):
    xa = tf.einsum("ni,nir->nr", x, tf.gather(a_stack, ids))
    return tf.matmul(x, w) + tf.gather(scales, ids)[:, None] * tf.einsum(
        "nr,nro->no", xa, tf.gather(b_stack, ids)
    )


def batched(n, n_in, n_out, rank, adapters, args):
    rng = np.random.default_rng(2)
    x, w, a, b = _tensors(
        rng, tf.float32, (n, n_in), (n_in, n_out), (adapters, n_in, rank), (adapters, rank, n_out)
    )
    ids = tf.constant(rng.integers(0, adapters, size=n), tf.int32)
    scales = tf.constant(rng.uniform(0.5, 2.0, size=adapters), tf.float32)
    np.testing.assert_allclose(
        batched_lora_matmul(x, w, a, b, ids, scales),
        gather_einsum(x, w, a, b, ids, scales),
        rtol=1e-4,
        atol=1e-4,
    )
    med = bench_util.compare(
        {
            "matmul": (plain_matmul, (x, w, a, b, ids, scales)),
            "tf_lora": (batched_lora_matmul, (x, w, a, b, ids, scales)),
            "gather": (gather_einsum, (x, w, a, b, ids, scales)),
        },
        args.iters,
        args.rounds,
    )
    ms = {k: v * 1e3 for k, v in med.items()}
    print(
        f"batched N={n:<5d} {adapters} adapters   tf.matmul {ms['matmul']:6.2f} ms   batched_lora_matmul "
        f"{ms['tf_lora']:6.2f} ms ({med['tf_lora'] / med['matmul']:.3f}x matmul)   gather+einsum "
        f"{ms['gather']:6.2f} ms ({med['gather'] / med['matmul']:.3f}x matmul)"
    )


def main():
    parser = bench_util.parser(__doc__.splitlines()[0])
    parser.add_argument("--in", dest="n_in", type=int, default=4096)
    parser.add_argument("--out", dest="n_out", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--decode", type=int, nargs="*", default=[1, 16])
    parser.add_argument("--batch", type=int, nargs="*", default=[4096])
    parser.add_argument("--served", type=int, nargs="*", default=[256], help="N for the batched case")
    parser.add_argument("--adapters", type=int, default=8)
    args = parser.parse_args()
    bench_util.header(args)
    print(f"in={args.n_in} out={args.n_out} r={args.rank} float32")
    for n in args.decode:
        decode(n, args.n_in, args.n_out, args.rank, args)
    for n in args.batch:
        apply(n, args.n_in, args.n_out, args.rank, args)
    for n in args.served:
        batched(n, args.n_in, args.n_out, args.rank, args.adapters, args)


if __name__ == "__main__":
    main()
