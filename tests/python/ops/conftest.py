"""Op tests on every device TensorFlow sees.

A module with `pytestmark = pytest.mark.usefixtures("on_each_device")` runs each of its tests once on the
CPU and once on the GPU. The GPU run skips, saying why, where TensorFlow sees no GPU, and for tests marked
`cpu_only` (the CPU kernels' own memory, threads, huge pages). Ops without a GPU kernel for a dtype
(float64) run on the CPU there, as TensorFlow places them.
"""

import pytest
import tensorflow as tf

HAS_GPU = bool(tf.config.list_physical_devices("GPU"))


@pytest.fixture(params=["cpu", "gpu"])
def on_each_device(request):
    if request.param == "gpu":
        if not HAS_GPU:
            pytest.skip("no GPU visible to TensorFlow: the GPU run of this test needs a GPU machine")
        if request.node.get_closest_marker("cpu_only") is not None:
            pytest.skip("tests the CPU kernels' own memory or threading")
    with tf.device("/GPU:0" if request.param == "gpu" else "/CPU:0"):
        yield request.param
