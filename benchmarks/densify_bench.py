"""Benchmark: the lookup of a `tf-lora densify`d model (core ops: a TensorFlow hash table from id to row,
a gather) against the tf_lora table it replaces, and against the same lookup written by hand, same run.

  table      the original SavedModel: SparseTablePull(training=False) on a tf_lora.SparseTable
  densified  the same model after tf_lora.rewrite.densify, loaded back (what TF Serving runs)
  tf_hash    tf.lookup.StaticHashTable (id -> row index) + tf.gather, written and saved in Python: what one
             writes by hand in stock TF (the densified model should match it)

Every candidate is a loaded SavedModel's signature, so each pays the same call overhead. Batches of Zipf(1.2)
ids over `--keys` held ids (10% of the batch ids the table does not hold), dim 16.

    .venv/bin/python benchmarks/densify_bench.py [--allocator bfc] [--keys 1000000] [--batch 4096 65536]
"""

import bench_util  # noqa: I001 - before TensorFlow: picks the allocator

import os
import shutil
import tempfile

import numpy as np
import tensorflow as tf

import tf_lora


class TableModel(tf.Module):
    def __init__(self, contents, dim):
        super().__init__()
        self.table = tf_lora.SparseTable(dim, name="items")
        self.table.import_(contents)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64)])
    def __call__(self, ids):
        return self.table.pull(ids)


class HashModel(tf.Module):
    def __init__(self, keys, values):
        super().__init__()
        self.rows = tf.Variable(np.concatenate([values, np.zeros((1, values.shape[1]), np.float32)]))
        self.index = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(keys, np.arange(len(keys), dtype=np.int64)),
            default_value=len(keys),
        )

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64)])
    def __call__(self, ids):
        return tf.gather(self.rows, self.index.lookup(ids))


def main():
    args = bench_util.table_parser(__doc__.splitlines()[0]).parse_args()
    bench_util.header(args, "median of interleaved calls of loaded SavedModels' signatures")
    rng = np.random.default_rng(0)
    keys = rng.choice(1 << 40, args.keys, replace=False).astype(np.int64)  # sparse, unsorted ids
    values = rng.standard_normal((args.keys, args.dim)).astype(np.float32)
    contents = {
        "keys": keys,
        "values": values,
        "slots": np.zeros((args.keys, 0), np.float32),
        "update_counts": np.ones(args.keys, np.int64),
        "last_steps": np.zeros(args.keys, np.int64),
        "step": np.array(1, np.int64),
    }
    work = tempfile.mkdtemp(prefix="densify_bench_")
    try:
        table_dir, dense_dir, hash_dir = (os.path.join(work, n) for n in ("table", "densified", "hash"))
        tf.saved_model.save(TableModel(contents, args.dim), table_dir)
        tf_lora.rewrite.densify(table_dir, dense_dir)
        tf.saved_model.save(HashModel(keys, values), hash_dir)
        models = {
            name: tf.saved_model.load(d)
            for name, d in [("table", table_dir), ("densified", dense_dir), ("tf_hash", hash_dir)]
        }
        for batch in args.batch:
            picks = keys[(rng.zipf(1.2, batch) - 1) % args.keys]
            unheld = rng.random(batch) < 0.1
            ids = tf.constant(np.where(unheld, -picks - 1, picks))
            outputs = {
                name: m.signatures["serving_default"](ids=ids)["output_0"].numpy()
                for name, m in models.items()
            }
            for name in ("densified", "tf_hash"):
                np.testing.assert_array_equal(outputs[name], outputs["table"], err_msg=name)
            times = bench_util.compare(
                {name: (m.signatures["serving_default"], [ids]) for name, m in models.items()},
                args.iters,
                args.rounds,
            )
            ms = {name: f"{t * 1e3:.3f} ms" for name, t in times.items()}
            print(
                f"batch {batch:6d}: table {ms['table']}, densified {ms['densified']}, "
                f"tf_hash {ms['tf_hash']}; "
                f"densified / table {times['densified'] / times['table']:.2f}x the time, "
                f"densified / tf_hash {times['densified'] / times['tf_hash']:.2f}x"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
