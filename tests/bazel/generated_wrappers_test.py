"""The generated gen_lora_ops module and its op library, straight from Bazel's outputs."""

import os
import unittest

import numpy as np

import tf_lora
from tf_lora.python.ops import gen_lora_ops


class GeneratedWrappersTest(unittest.TestCase):
    def test_imports_build_outputs_not_an_installed_wheel(self):
        self.assertIn(".runfiles", tf_lora.__file__)
        self.assertNotIn("site-packages", gen_lora_ops.__file__)
        ops_dir = os.path.dirname(gen_lora_ops.__file__)
        self.assertTrue(os.path.isfile(os.path.join(ops_dir, "_lora_ops.so")))

    def test_generated_op_matches_numpy(self):
        rng = np.random.default_rng(0)
        w, a, b = (rng.standard_normal(s).astype(np.float32) for s in [(37, 45), (37, 5), (5, 45)])
        merged = gen_lora_ops.tf_lora_lora_merge(w, a, b, np.float32(0.3)).numpy()
        np.testing.assert_allclose(merged, w + 0.3 * a @ b, rtol=1e-5, atol=1e-5)


if __name__ == "__main__":
    unittest.main()
