"""The `>>>` examples in the public API's docstrings run and print what they say."""

import doctest
import inspect

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_lora

PUBLIC_CALLABLES = sorted(n for n in tf_lora.__all__ if callable(getattr(tf_lora, n))) + [
    f"layers.{n}" for n in tf_lora.layers.__all__
]


@pytest.mark.parametrize("name", PUBLIC_CALLABLES)
def test_docstring_examples(name):
    fn = tf_lora
    for part in name.split("."):
        fn = getattr(fn, part)
    assert fn.__doc__ and ">>>" in fn.__doc__, f"{name} has no example"
    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    globs = {"tf": tf, "tf_lora": tf_lora, "np": np, "keras": keras}
    for test in finder.find(fn, name, module=inspect.getmodule(fn), globs=globs):
        runner.run(test)
    assert runner.failures == 0 and runner.tries > 0
