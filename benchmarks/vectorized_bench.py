"""Per-example gradients, as DP-SGD computes them with `tf.vectorized_map` (TensorFlow Privacy's
vectorized optimizers): a two-layer MLP with LoRA on both Dense layers, [examples, tokens, 1024], the
gradient of each example's loss with respect to the adapters. In the same run, calls interleaved:

- tf_lora's LoRA layers, vectorized through tf_lora's pfor converters (fused kernels over all examples);
- Keras's own LoRA (`enable_lora`: stock ops, which pfor vectorizes with its own converters);
- tf_lora's layers as they ran before the converters: pfor's while_loop fallback, one example at a time.

    .venv/bin/python benchmarks/vectorized_bench.py [--allocator bfc] [--examples 32] [--tokens 64]

Ratios are the other candidate's time over tf_lora's (> 1: tf_lora faster).
"""

import bench_util  # noqa: I001 - sets the allocator before TensorFlow starts

import contextlib

import keras
import numpy as np
import tensorflow as tf
from tensorflow.python.ops.parallel_for import pfor

import tf_lora

WIDTH, RANK = 1024, 16


def _mlp(lora):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, WIDTH))
    hidden = keras.layers.Dense(WIDTH, activation="relu", name="fc1")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(WIDTH, name="fc2")(hidden))
    if lora == "keras":
        for layer in model.layers[1:]:
            layer.enable_lora(RANK, lora_alpha=RANK)
            layer.bias.trainable = False  # as inject_lora freezes it: adapters only
    else:
        model, _ = tf_lora.inject_lora(model, rank=RANK, alpha=RANK)
    rng = np.random.default_rng(1)
    for weight in model.trainable_weights:  # the same non-zero adapters in every candidate
        weight.assign(rng.standard_normal(weight.shape).astype(np.float32) * 0.02)
    return model


@contextlib.contextmanager
def _without_converters():
    """pfor as it was before tf_lora registered converters: the LoRA ops run in a while_loop."""
    saved = {k: v for k, v in pfor._pfor_converter_registry.items() if k.startswith("TfLora>")}  # noqa: SLF001
    for key in saved:
        del pfor._pfor_converter_registry[key]  # noqa: SLF001
    try:
        yield
    finally:
        pfor._pfor_converter_registry.update(saved)  # noqa: SLF001


def _per_example_gradients(model, x, fallback):
    def one(xi):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(xi[None])))
        return tape.gradient(loss, model.trainable_weights)

    fn = tf.function(lambda x: tf.vectorized_map(one, x, fallback_to_while_loop=fallback))
    fn.get_concrete_function(x)  # traced (and vectorized) now
    return fn


def main():
    p = bench_util.parser(__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=32)
    p.add_argument("--tokens", type=int, nargs="+", default=[64, 8])
    args = p.parse_args()
    bench_util.header(args)
    ours, keras_model = _mlp("tf_lora"), _mlp("keras")
    for tokens in args.tokens:
        x = tf.constant(np.random.default_rng(2).standard_normal((args.examples, tokens, WIDTH)), tf.float32)
        fused = _per_example_gradients(ours, x, fallback=False)
        with _without_converters():
            looped = _per_example_gradients(ours, x, fallback=True)
        stock = _per_example_gradients(keras_model, x, fallback=False)
        for got, want in zip(fused(x), looped(x), strict=True):  # the same gradients
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-6)
        times = bench_util.compare(
            {"tf_lora": (fused, (x,)), "keras": (stock, (x,)), "while_loop": (looped, (x,))},
            args.iters,
            args.rounds,
        )
        ms = {k: 1e3 * v for k, v in times.items()}
        print(
            f"per-example grads, {args.examples} examples x {tokens} tokens, {WIDTH} wide, r={RANK}: "
            f"tf_lora {ms['tf_lora']:7.2f} ms   Keras LoRA {ms['keras']:7.2f} ms "
            f"{ms['keras'] / ms['tf_lora']:4.2f}x   while_loop {ms['while_loop']:7.2f} ms "
            f"{ms['while_loop'] / ms['tf_lora']:4.2f}x"
        )


if __name__ == "__main__":
    main()
