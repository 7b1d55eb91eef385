"""The `>>>` examples in the public API's docstrings run and print what they say."""

import doctest

import numpy as np
import pytest
import tensorflow as tf

import tf_lora
from tf_lora.python.ops import lora_ops


@pytest.mark.parametrize("name", sorted(n for n in tf_lora.__all__ if n != "__version__"))
def test_docstring_examples(name):
    fn = getattr(tf_lora, name)
    assert fn.__doc__ and ">>>" in fn.__doc__, f"{name} has no example"
    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    for test in finder.find(fn, name, module=lora_ops, globs={"tf": tf, "tf_lora": tf_lora, "np": np}):
        runner.run(test)
    assert runner.failures == 0 and runner.tries > 0
