"""Memory of a tf_lora.SparseTable: resident bytes per key against the raw payload.

Fills a table with `--keys` keys (dim 16, Adagrad: values + one slot per value, update count, last step)
by training pulls in batches, and reads the process's resident set size (VmRSS) before and after.

    .venv/bin/python benchmarks/sparse_table_memory.py [--keys 10000000]
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_lora  # noqa: E402


def resident_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=10_000_000)
    parser.add_argument("--dim", type=int, default=16)
    args = parser.parse_args()
    table = tf_lora.SparseTable(args.dim, optimizer=tf_lora.sparse_optimizers.Adagrad(0.01))
    pull = tf.function(lambda ids: tf.shape(table.pull(ids, training=True)))
    batch = 1 << 20
    pull(tf.constant(np.arange(-batch, 0, dtype=np.int64)))  # warm up TF and the op
    table.remove(np.arange(-batch, 0, dtype=np.int64))
    before = resident_bytes()
    for start in range(0, args.keys, batch):
        ids = np.arange(start, min(start + batch, args.keys), dtype=np.int64) * 7919 + 13
        pull(tf.constant(ids))
    after = resident_bytes()
    n = int(table.size())
    payload = n * (8 + 4 * args.dim * 2 + 8 + 8)  # key, values, Adagrad slot, update count, last step
    print(
        f"{n:,} keys, dim {args.dim}, Adagrad: resident {(after - before) / 2**20:,.0f} MiB = "
        f"{(after - before) / n:.1f} bytes/key; raw payload {payload / n:.0f} bytes/key; "
        f"ratio {(after - before) / payload:.2f}x"
    )


if __name__ == "__main__":
    main()
