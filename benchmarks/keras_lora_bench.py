"""tf_lora's LoRA layers against Keras's own LoRA (`enable_lora`), in the same run, calls interleaved:
forward and forward+backward (gradients of the trainable weights) in tf.function, for each layer kind
tf_lora adapts (Dense, EinsumDense as an attention query and output projection, Embedding) and for a
keras-hub GPT-2 transformer block with LoRA on its query and value projections (Keras's default targets).

    .venv/bin/python benchmarks/keras_lora_bench.py [--allocator bfc] [--iters N] [--rounds N]

The ratio is Keras's time over tf_lora's (> 1: tf_lora faster). Keras materialises `kernel + a @ b` on
every call (EinsumDense, Embedding) or adds `x @ a @ b` with separate ops (Dense); tf_lora runs the layer's
own matmul/einsum and then the fused LoRA apply on its output rows.
"""

import bench_util  # noqa: I001 - sets the allocator before TensorFlow starts

import keras
import numpy as np
import tensorflow as tf

import tf_lora

RANK = 8


def _pair(make, x, kind_name):
    """(Keras-LoRA layer, tf_lora layer) with the same weights, built on x."""
    keras_layer, ours = make(), make()
    keras_layer(x)
    ours(x)
    ours.set_weights(keras_layer.get_weights())
    keras_layer.enable_lora(RANK, lora_alpha=RANK)
    tf_lora.layers.to_lora(ours, RANK, RANK)
    for layer in (keras_layer, ours):  # the same non-zero adapter, so nothing is skipped
        names = ("lora_embeddings_b",) if kind_name == "Embedding" else ("lora_kernel_b",)
        b = getattr(layer, names[0], None) if layer is keras_layer else layer.adapter_slot().b
        b.assign(np.full(b.shape, 0.01, np.float32))
    return keras_layer, ours


def _functions(layer, x):
    forward = tf.function(lambda x: layer(x))

    @tf.function
    def forward_backward(x):
        with tf.GradientTape() as tape:
            y = layer(x)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) ** 2)
        return tape.gradient(loss, layer.trainable_weights)

    return forward, forward_backward


def _report(name, keras_model, ours, x, args):
    keras_fwd, keras_fb = _functions(keras_model, x)
    ours_fwd, ours_fb = _functions(ours, x)
    times = bench_util.compare(
        {
            "keras fwd": (keras_fwd, (x,)),
            "tf_lora fwd": (ours_fwd, (x,)),
            "keras fwd+bwd": (keras_fb, (x,)),
            "tf_lora fwd+bwd": (ours_fb, (x,)),
        },
        args.iters,
        args.rounds,
    )
    ms = {key: 1e3 * value for key, value in times.items()}
    print(
        f"{name:<46} fwd: keras {ms['keras fwd']:7.2f} ms  tf_lora {ms['tf_lora fwd']:7.2f} ms  "
        f"{ms['keras fwd'] / ms['tf_lora fwd']:4.2f}x   fwd+bwd: keras {ms['keras fwd+bwd']:7.2f} ms  "
        f"tf_lora {ms['tf_lora fwd+bwd']:7.2f} ms  {ms['keras fwd+bwd'] / ms['tf_lora fwd+bwd']:4.2f}x"
    )


def main():
    p = bench_util.parser(__doc__.splitlines()[0])
    p.add_argument("--skip-block", action="store_true", help="layers only, no keras-hub block")
    args = p.parse_args()
    bench_util.header(args)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((8, 128, 1024)).astype(np.float32))
    heads = tf.constant(rng.standard_normal((8, 128, 16, 64)).astype(np.float32))
    ids = tf.constant(rng.integers(0, 32000, (8, 128)).astype(np.int32))
    cases = [
        ("Dense 1024 -> 1024, x [8, 128, 1024]", lambda: keras.layers.Dense(1024), x, "Dense"),
        (
            "EinsumDense query abc,cde->abde [1024,16,64]",
            lambda: keras.layers.EinsumDense("abc,cde->abde", (None, 16, 64), bias_axes="de"),
            x,
            "EinsumDense",
        ),
        (
            "EinsumDense output abcd,cde->abe [16,64,1024]",
            lambda: keras.layers.EinsumDense("abcd,cde->abe", (None, 1024), bias_axes="e"),
            heads,
            "EinsumDense",
        ),
        (
            "Embedding 32000 x 1024, ids [8, 128]",
            lambda: keras.layers.Embedding(32000, 1024),
            ids,
            "Embedding",
        ),
    ]
    for name, make, inputs, kind in cases:
        keras_layer, ours = _pair(make, inputs, kind)
        _report(name, keras_layer, ours, inputs, args)
    if args.skip_block:
        return
    import keras_hub  # noqa: PLC0415 - only for the block

    def backbone():
        keras.utils.set_random_seed(0)
        return keras_hub.models.GPT2Backbone(
            vocabulary_size=1000,
            num_layers=1,
            num_heads=16,
            hidden_dim=1024,
            intermediate_dim=4096,
            max_sequence_length=128,
        )

    keras_model, ours = backbone(), backbone()
    keras_model.enable_lora(RANK)  # query and value, alpha = rank
    tf_lora.inject_lora(ours, rank=RANK, alpha=RANK, target=r".*(query|value)", copy=False)
    for layer in keras_model._flatten_layers(include_self=False):
        if getattr(layer, "lora_enabled", False):
            layer.lora_kernel_b.assign(np.full(layer.lora_kernel_b.shape, 0.01, np.float32))
    for layer in tf_lora.layers.lora_layers(ours).values():
        layer.adapter_slot().b.assign(np.full(layer.adapter_slot().b.shape, 0.01, np.float32))
    tokens = {"token_ids": ids % 1000, "padding_mask": tf.ones_like(ids)}
    _report("keras-hub GPT-2 block, 1024 wide, [8, 128]", keras_model, ours, tokens, args)


if __name__ == "__main__":
    main()
