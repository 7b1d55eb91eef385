"""Benchmark: what sharding a table costs, same run: a training step's pull and push (Adagrad) on

  local      one tf_lora.SparseTable in this process
  sharded    a tf_lora.ShardedSparseTable of two shards in this process (the partition and stitch alone)
  remote     a ShardedSparseTable on two parameter servers of a TensorFlow cluster (in-process servers on
             localhost: the gRPC transfers of ids and rows, on the same cores)

dim 16, batches of Zipf(1.2) ids over `--keys` ids already in the tables.

    .venv/bin/python benchmarks/sharded_table_bench.py [--allocator bfc] [--keys 1000000] [--batch 4096 65536]
"""

import bench_util  # noqa: I001 - before TensorFlow: picks the allocator

import socket

import numpy as np
import tensorflow as tf

import tf_lora


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def main():
    args = bench_util.table_parser(__doc__.splitlines()[0]).parse_args()
    spec = {"worker": [f"localhost:{free_port()}"], "ps": [f"localhost:{free_port()}" for _ in range(2)]}
    cluster = tf.train.ClusterSpec(spec)
    servers = [tf.distribute.Server(cluster, job_name="ps", task_index=k, start=True) for k in range(2)]
    tf.config.experimental_connect_to_cluster(cluster, job_name="worker", task_index=0)
    bench_util.header(args, "median of interleaved training steps (pull + push) in tf.function")
    rng = np.random.default_rng(0)
    keys = np.arange(args.keys, dtype=np.int64)
    contents = {
        "keys": keys,
        "values": rng.standard_normal((args.keys, args.dim)).astype(np.float32) * 0.01,
        "slots": np.full((args.keys, args.dim), 0.1, np.float32),
        "update_counts": np.zeros(args.keys, np.int64),
        "last_steps": np.zeros(args.keys, np.int64),
        "step": np.array(0, np.int64),
    }

    def adagrad():
        return tf_lora.sparse_optimizers.Adagrad(0.05)

    with tf.device("/job:worker/task:0"):
        tables = {
            "local": tf_lora.SparseTable(args.dim, optimizer=adagrad()),
            "sharded": tf_lora.ShardedSparseTable(args.dim, ["/job:worker/task:0"] * 2, optimizer=adagrad()),
        }
    tables["remote"] = tf_lora.ShardedSparseTable(
        args.dim, ["/job:ps/task:0", "/job:ps/task:1"], optimizer=adagrad()
    )
    for table in tables.values():
        table.import_(contents)

    def step_of(table):
        @tf.function
        def step(ids):
            rows = table.pull(ids, training=True)
            table.push(ids, rows * 0.01)
            return tf.reduce_sum(rows)

        return step

    steps = {name: step_of(table) for name, table in tables.items()}
    for batch in args.batch:
        ids = tf.constant(((rng.zipf(1.2, batch) - 1) % args.keys).astype(np.int64))
        times = bench_util.compare({name: (fn, [ids]) for name, fn in steps.items()}, args.iters, args.rounds)
        ms = {name: f"{t * 1e3:.2f} ms" for name, t in times.items()}
        print(
            f"batch {batch:6d}: local {ms['local']}, sharded {ms['sharded']}, remote {ms['remote']}; "
            f"sharded / local {times['sharded'] / times['local']:.2f}x the time, "
            f"remote / local {times['remote'] / times['local']:.2f}x"
        )
    del servers


if __name__ == "__main__":
    main()
