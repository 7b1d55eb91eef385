"""tf_lora's op wrappers. Generated `gen_*_ops` modules sit beside these files in the wheel; in a source
tree they are build outputs, found in bazel-bin."""

from tf_lora.python.ops import _loader

__path__.extend(_loader.development_dirs())  # noqa: F821 - a package's __path__.
