"""Benchmark: tf_lora.SparseTable pull and push against TensorFlow's own ops, same run.

  pull  table.pull(ids, training=True) against tf.lookup.experimental.DenseHashTable.lookup, and against
        tf.gather on a dense variable of the same rows (the bound for a lookup)
  push  table.push with Adagrad against unique + unsorted_segment_sum + ResourceSparseApplyAdagradV2 on
        a dense variable

dim 16, batches of 65,536 Zipf(1.2) ids over 1M keys already in the tables.

    .venv/bin/python benchmarks/sparse_table_bench.py [--allocator bfc] [--keys 1000000 --batch 65536]
"""

import bench_util  # noqa: I001 - before TensorFlow: picks the allocator

import numpy as np
import tensorflow as tf

import tf_lora


def zipf_ids(rng, n, keys):
    return ((rng.zipf(1.2, n) - 1) % keys).astype(np.int64)


def main():
    parser = bench_util.parser(__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=65_536)
    parser.add_argument("--dim", type=int, default=16)
    args = parser.parse_args()
    bench_util.header(args)
    rng = np.random.default_rng(0)
    keys, dim = args.keys, args.dim
    all_ids = tf.constant(np.arange(keys, dtype=np.int64))
    init = rng.standard_normal((keys, dim)).astype(np.float32) * 0.01

    lr = 0.05
    table = tf_lora.SparseTable(dim, optimizer=tf_lora.sparse_optimizers.Adagrad(lr))
    table.import_(
        {
            "keys": all_ids,
            "values": init,
            "slots": np.full((keys, dim), 0.1, np.float32),
            "update_counts": np.zeros(keys, np.int64),
            "last_steps": np.zeros(keys, np.int64),
            "step": 0,
        }
    )
    hash_table = tf.lookup.experimental.DenseHashTable(
        tf.int64, tf.float32, default_value=tf.zeros([dim]), empty_key=-1, deleted_key=-2
    )
    hash_table.insert(all_ids, init)
    dense = tf.Variable(init)
    accum = tf.Variable(tf.fill([keys, dim], 0.1))
    ids = tf.constant(zipf_ids(rng, args.batch, keys))
    grads = tf.constant(rng.standard_normal((args.batch, dim)).astype(np.float32))
    distinct = len(np.unique(ids))
    print(f"dim {dim}, {keys:,} keys, batches of {args.batch:,} Zipf(1.2) ids ({distinct:,} distinct)")

    # Arguments that every candidate takes, so per-call Python overhead is the same for all.
    pull = tf.function(lambda ids, grads: table.pull(ids, training=True))
    lookup = tf.function(lambda ids, grads: hash_table.lookup(ids))
    gather = tf.function(lambda ids, grads: tf.gather(dense, ids))
    np.testing.assert_allclose(pull(ids, grads), lookup(ids, grads))
    np.testing.assert_allclose(pull(ids, grads), gather(ids, grads))
    med = bench_util.compare(
        {"tf_lora": (pull, (ids, grads)), "hash": (lookup, (ids, grads)), "gather": (gather, (ids, grads))},
        args.iters,
        args.rounds,
    )
    rate = {k: args.batch / v / 1e6 for k, v in med.items()}
    print(
        f"pull   tf_lora {rate['tf_lora']:6.1f} M ids/s   DenseHashTable {rate['hash']:6.1f} M ids/s "
        f"({med['hash'] / med['tf_lora']:.2f}x)   tf.gather {rate['gather']:6.1f} M ids/s "
        f"(tf_lora at {med['gather'] / med['tf_lora']:.2f}x of it)"
    )

    @tf.function
    def dense_adagrad(ids, grads):
        unique, index = tf.unique(ids)
        summed = tf.math.unsorted_segment_sum(grads, index, tf.size(unique))
        tf.raw_ops.ResourceSparseApplyAdagradV2(
            var=dense.handle, accum=accum.handle, lr=lr, epsilon=1e-7, grad=summed, indices=unique
        )

    push = tf.function(lambda ids, grads: table.push(ids, grads))
    med = bench_util.compare(
        {"tf_lora": (push, (ids, grads)), "tf": (dense_adagrad, (ids, grads))}, args.iters, args.rounds
    )
    print(
        f"push   tf_lora {distinct / med['tf_lora'] / 1e6:6.1f} M rows/s   unique + segment_sum + "
        f"ResourceSparseApplyAdagrad {distinct / med['tf'] / 1e6:6.1f} M rows/s   "
        f"speedup {med['tf'] / med['tf_lora']:.2f}x   ({args.batch / med['tf_lora'] / 1e6:.1f} M ids/s)"
    )


if __name__ == "__main__":
    main()
