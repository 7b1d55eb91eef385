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
    w = t(d_in, d_out)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, a, b, a_stack, b_stack, scales])
        out = tf_lora.lora_apply(y, x, a, b, 0.5)
        batched = tf_lora.batched_lora_apply(y, x, a_stack, b_stack, ids, scales)
        loss = tf.reduce_sum(out * g) + tf.reduce_sum(batched * g)
    results = {"apply": out, "batched": batched, "merge": tf_lora.lora_merge(w, a, b, 0.5)}
    for name, grad in zip(["dx", "da", "db", "da_stack", "db_stack", "dscales"],
                          tape.gradient(loss, [x, a, b, a_stack, b_stack, scales])):
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
    assert sorted(one.files) == sorted(two.files) and len(one.files) == 9
    for name in one.files:
        np.testing.assert_array_equal(one[name], two[name], err_msg=name)
