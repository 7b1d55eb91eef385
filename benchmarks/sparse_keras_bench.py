"""End-to-end Keras training: tf_lora.layers.SparseEmbedding + MLP against the same model on TensorFlow's
own MutableHashTable (id -> row) + Variable gather, on synthetic Zipf click data. Reports examples/s.

Both models: 4 id features per example drawn from Zipf(1.2) over `--ids` ids, embeddings of dim 16
summed, Dense(64, relu), Dense(1, sigmoid), all trained with Adagrad(0.05) (the baseline's embedding rows by
Keras's Adagrad, tf_lora's by the table's). The baseline maps new ids to rows of a preallocated [ids, 16]
variable as they come.

    .venv/bin/python benchmarks/sparse_keras_bench.py [--allocator bfc] [--examples 262144]
"""

import time

import bench_util  # noqa: I001 - before TensorFlow: picks the allocator
import keras
import numpy as np
import tensorflow as tf

import tf_lora


class HashTableEmbedding(keras.layers.Layer):
    """The TensorFlow baseline: MutableHashTable id -> row, rows in a Variable, summed over features."""

    def __init__(self, capacity, dim, **kwargs):
        super().__init__(**kwargs)
        self.rows = self.add_weight(
            shape=(capacity, dim), initializer=keras.initializers.RandomNormal(stddev=0.05)
        )
        self.index = tf.lookup.experimental.MutableHashTable(tf.int64, tf.int64, default_value=-1)
        self.next_row = tf.Variable(0, dtype=tf.int64, trainable=False)

    def call(self, ids, training=None):
        flat = tf.reshape(ids, [-1])
        if training:
            unique, _ = tf.unique(flat)
            known = tf.reshape(self.index.lookup(unique), [-1])
            new = tf.boolean_mask(unique, known < 0)
            start = self.next_row.assign_add(tf.size(new, out_type=tf.int64)) - tf.size(
                new, out_type=tf.int64
            )
            self.index.insert(new, start + tf.range(tf.size(new, out_type=tf.int64)))
        rows = tf.gather(self.rows, tf.maximum(self.index.lookup(flat), 0))
        return tf.reduce_sum(tf.reshape(rows, [tf.shape(ids)[0], -1, self.rows.shape[1]]), axis=1)


def build(embedding, features):
    inp = keras.Input((features,), dtype="int64")
    hidden = keras.layers.Dense(64, activation="relu")(embedding(inp))
    model = keras.Model(inp, keras.layers.Dense(1, activation="sigmoid")(hidden))
    return model


def main():
    parser = bench_util.parser(__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, default=1_000_000)
    parser.add_argument("--examples", type=int, default=262_144)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    bench_util.header(args, timing="wall time of model.fit after a traced warm-up")
    rng = np.random.default_rng(0)
    features, dim = 4, 16
    x = ((rng.zipf(1.2, (args.examples, features)) - 1) % args.ids).astype(np.int64)
    weight = rng.standard_normal(args.ids).astype(np.float32)
    y = (rng.random(args.examples) < 1 / (1 + np.exp(-weight[x].sum(1)))).astype(np.float32)

    keras.utils.set_random_seed(0)
    ours = build(
        tf_lora.layers.SparseEmbedding(
            dim, combiner="sum", optimizer=tf_lora.sparse_optimizers.Adagrad(0.05)
        ),
        features,
    )
    theirs = build(HashTableEmbedding(args.ids, dim), features)
    ours.compile(optimizer=keras.optimizers.Adagrad(0.05), loss="binary_crossentropy")
    theirs.compile(optimizer=keras.optimizers.Adagrad(0.05), loss="binary_crossentropy")

    results = {}
    for name, model in (("tf_lora", ours), ("tf", theirs)):
        model.fit(
            x[: args.batch * 2], y[: args.batch * 2], batch_size=args.batch, epochs=1, verbose=0
        )  # trace
        start = time.perf_counter()
        history = model.fit(x, y, batch_size=args.batch, epochs=args.epochs, verbose=0)
        elapsed = time.perf_counter() - start
        results[name] = (args.examples * args.epochs / elapsed, history.history["loss"][-1])
    print(
        f"{args.examples:,} examples x {args.epochs} epochs, batch {args.batch}, {features} Zipf(1.2) ids "
        f"each over {args.ids:,}: SparseEmbedding {results['tf_lora'][0]:,.0f} examples/s (loss "
        f"{results['tf_lora'][1]:.3f}); MutableHashTable + gather {results['tf'][0]:,.0f} examples/s (loss "
        f"{results['tf'][1]:.3f}); speedup {results['tf_lora'][0] / results['tf'][0]:.2f}x"
    )


if __name__ == "__main__":
    main()
