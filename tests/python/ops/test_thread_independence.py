"""Every LoRA op gives bit-identical results whatever the number of intra-op threads."""

import os
import subprocess
import sys
import textwrap

import numpy as np

SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(int(sys.argv[1]))
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import tf_lora

    rng = np.random.default_rng(0)
    n, d_in, d_out, r, k = 2100, 96, 80, 8, 3
    t = lambda *s: tf.constant(rng.standard_normal(s), tf.float32)
    y, x, a, b, g = t(n, d_out), t(n, d_in), t(d_in, r), t(r, d_out), t(n, d_out)
    a_stack, b_stack, scales = t(k, d_in, r), t(k, r, d_out), t(k)
    ids = tf.constant(rng.integers(-1, k, n), tf.int32)
    # Half the rows on adapter 0, the rest spread over 39 adapters of a few dozen rows: the multi-adapter
    # gradient runs small adapters side by side, one per thread, and large ones over their own shards.
    k2 = 40
    a_stack2, b_stack2, scales2 = t(k2, d_in, r), t(k2, r, d_out), t(k2)
    ids2 = tf.constant(np.where(rng.random(n) < 0.5, 0, rng.integers(-1, k2, n)), tf.int32)
    w = t(d_in, d_out)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, a, b, a_stack, b_stack, scales, a_stack2, b_stack2, scales2])
        out = tf_lora.lora_apply(y, x, a, b, 0.5)
        batched = tf_lora.batched_lora_apply(y, x, a_stack, b_stack, ids, scales)
        batched2 = tf_lora.batched_lora_apply(y, x, a_stack2, b_stack2, ids2, scales2)
        loss = tf.reduce_sum(out * g) + tf.reduce_sum(batched * g) + tf.reduce_sum(batched2 * g)
    results = {"apply": out, "batched": batched, "batched2": batched2,
               "merge": tf_lora.lora_merge(w, a, b, 0.5)}
    names = ["dx", "da", "db", "da_stack", "db_stack", "dscales", "da_stack2", "db_stack2", "dscales2"]
    for name, grad in zip(names, tape.gradient(
            loss, [x, a, b, a_stack, b_stack, scales, a_stack2, b_stack2, scales2])):
        results[name] = grad
    np.savez(sys.argv[2], **{k: v.numpy() for k, v in results.items()})
    """
)


def test_results_do_not_depend_on_thread_count(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    outputs = []
    for threads in (1, 2):
        path = tmp_path / f"threads{threads}.npz"
        proc = subprocess.run(
            [sys.executable, "-c", SCRIPT, str(threads), str(path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs.append(np.load(path))
    one, two = outputs
    assert sorted(one.files) == sorted(two.files) and len(one.files) == 13
    for name in one.files:
        np.testing.assert_array_equal(one[name], two[name], err_msg=name)
