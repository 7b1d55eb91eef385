"""The op library's GPU side, checked without a GPU: which ops have GPU kernels (TensorFlow's registry), which
architectures the library carries device code for (its fatbin, read by cuobjdump), and the ops on a GPU
when one is visible (skipped otherwise, saying why). The kernels' numerics are tests/gpu's."""

import os
import pathlib
import subprocess

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.framework import kernels

import tf_lora

REPO = pathlib.Path(__file__).resolve().parents[3]
GPU_OPS = {
    "LoraMerge": "scale",
    "ResourceLoraMerge": "scale",
    "LoraApply": "scale",
    "LoraApplyGrad": "scale",
    "BatchedLoraApply": "scales",
    "BatchedLoraApplyGrad": "scales",
}
GPU_DTYPES = {tf.float32, tf.float16, tf.bfloat16}
HAS_GPU = bool(tf.config.list_physical_devices("GPU"))


@pytest.mark.parametrize("op", sorted(GPU_OPS))
def test_gpu_kernels_are_registered_for_every_dtype(op):
    registered = kernels.get_registered_kernels_for_op("TfLora>" + op).kernel
    gpu = [k for k in registered if k.device_type == "GPU"]
    dtypes = {tf.as_dtype(k.constraint[0].allowed_values.list.type[0]) for k in gpu}
    assert dtypes == GPU_DTYPES, f"{op}: GPU kernels for {sorted(d.name for d in dtypes)}"
    for kernel in gpu:  # the scalars the input checks read arrive in host memory
        assert list(kernel.host_memory_arg) == [GPU_OPS[op]]


def test_every_lora_op_has_a_gpu_kernel():
    from tf_lora.python.ops import gen_lora_ops

    wrappers = [
        n for n in dir(gen_lora_ops) if n.startswith("tf_lora_") and not n.endswith("_eager_fallback")
    ]
    ops = {"".join(part.title() for part in name[len("tf_lora_") :].split("_")) for name in wrappers}
    assert ops == set(GPU_OPS)


def _cuobjdump():
    tool = REPO / ".cuda" / "bin" / "cuobjdump"
    if not tool.exists():
        pytest.fail(
            f"{tool} is missing: `make configure` assembles the CUDA toolchain (tools/cuda_toolchain.py)"
        )
    return str(tool)


def test_library_carries_device_code_for_the_promised_architectures():
    library = os.path.join(os.path.dirname(tf_lora.python.ops.lora_ops.__file__), "_lora_ops.so")
    listing = subprocess.run(
        [_cuobjdump(), "--list-elf", "--list-ptx", library], capture_output=True, text=True, check=True
    ).stdout
    cubins = {line.rsplit(".", 2)[-2] for line in listing.splitlines() if line.startswith("ELF file")}
    ptx = {line.rsplit(".", 2)[-2] for line in listing.splitlines() if line.startswith("PTX file")}
    assert cubins == {"sm_60", "sm_70", "sm_80", "sm_89", "sm_90"}, listing
    assert ptx == {"sm_90"}, listing  # compute_90 PTX: GPUs newer than sm_90 compile it at load


@pytest.mark.skipif(
    not HAS_GPU, reason="no GPU visible to TensorFlow: the GPU kernels run only on a GPU machine"
)
@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
def test_ops_on_the_gpu_match_the_cpu(dtype):
    rng = np.random.default_rng(0)
    w, a, b = (tf.cast(rng.standard_normal(s), dtype) for s in [(33, 65), (33, 8), (8, 65)])
    x, y = tf.cast(rng.standard_normal((70, 33)), dtype), tf.cast(rng.standard_normal((70, 65)), dtype)
    a_stack, b_stack = tf.stack([a, a * 2]), tf.stack([b, -b])
    ids = tf.constant(rng.integers(-1, 2, 70), tf.int32)

    def run():
        with tf.GradientTape() as tape:
            tape.watch([x, a, b])
            applied = tf_lora.lora_apply(y, x, a, b, 0.5)
        return [
            tf_lora.lora_merge(w, a, b, 0.5),
            applied,
            *tape.gradient(tf.reduce_sum(tf.cast(applied, tf.float32) ** 2), [x, a, b]),
            *batched(),
        ]

    def batched():
        scales = tf.constant([0.5, 1.5], dtype)
        with tf.GradientTape() as tape:
            tape.watch([x, a_stack, b_stack, scales])
            out = tf_lora.batched_lora_apply(y, x, a_stack, b_stack, ids, scales)
        loss = tf.reduce_sum(tf.cast(out, tf.float32) ** 2)
        return [out, *tape.gradient(loss, [x, a_stack, b_stack, scales])]

    with tf.device("/CPU:0"):
        want = run()
        var_cpu = tf.Variable(w)
        tf_lora.merge_into_variable(var_cpu, a, b, 0.5)
    with tf.device("/GPU:0"):
        got = run()
        var_gpu = tf.Variable(w)
        tf_lora.merge_into_variable(var_gpu, a, b, 0.5)
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"adapter_ids\[3\] = 2 is out of range"):
            bad = tf.tensor_scatter_nd_update(ids, [[3]], [2])
            tf_lora.batched_lora_apply(y, x, a_stack, b_stack, bad, tf.constant([0.5, 1.5], dtype)).numpy()
    want.append(var_cpu.value())
    got.append(var_gpu.value())
    tol = 1e-4 if dtype == tf.float32 else 3e-2
    for g, e in zip(got, want, strict=True):
        np.testing.assert_allclose(tf.cast(g, tf.float32), tf.cast(e, tf.float32), rtol=tol, atol=tol * 10)
