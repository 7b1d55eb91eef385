"""Shared benchmark plumbing: allocator choice, interleaved timing, the header line.

Import this module before TensorFlow: `--allocator bfc` must set TF_CPU_ALLOCATOR_USE_BFC before
TensorFlow starts. TensorFlow's default CPU allocator takes every large output from fresh pages; on a VM
the page faults for a 64 MiB output cost more than most kernels (measured here: 28 of the 33 ms of a
4096x4096 float32 streaming pass), so results are reported with both allocators.
"""

import argparse
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if "bfc" in sys.argv and "--allocator" in sys.argv or "--allocator=bfc" in sys.argv:
    os.environ["TF_CPU_ALLOCATOR_USE_BFC"] = "true"


def parser(description):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--allocator", choices=["default", "bfc"], default="default")
    p.add_argument("--iters", type=int, default=10, help="calls per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    return p


def table_parser(description):
    """`parser` with the sparse-table benchmarks' sizes: ids held, batch sizes, row width."""
    p = parser(description)
    p.add_argument("--keys", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, nargs="+", default=[4096, 65_536])
    p.add_argument("--dim", type=int, default=16)
    return p


def header(args, timing=None):
    import tensorflow as tf

    import tf_lora

    timing = timing or f"median of {args.iters * args.rounds} calls in tf.function"
    print(
        f"tf_lora {tf_lora.__version__}, TensorFlow {tf.__version__}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, {args.allocator} CPU allocator; {timing}"
    )


def compare(candidates, iters, rounds):
    """Median seconds of each `name: (fn, args)` over iters * rounds calls.

    Calls are interleaved one by one (A, B, C, A, B, C, ...; the order rotates every round), so the
    machine's bandwidth phases and drift hit every candidate alike instead of whichever ran in a bad
    stretch.
    """
    samples = {name: [] for name in candidates}
    for fn, args in candidates.values():  # trace and warm up
        fn(*args)
        fn(*args)
    names = list(candidates)
    for round_index in range(rounds):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for _ in range(iters):
            for name in order:
                fn, args = candidates[name]
                start = time.perf_counter()
                fn(*args)  # CPU: returns when the result is computed
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}
