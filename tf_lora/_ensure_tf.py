"""Checks at import that the installed TensorFlow is the minor tf_lora is built for."""

from tf_lora.version import TF_REQUIREMENT, __version__, tf_version_supported


def ensure_tensorflow():
    """Raises ImportError, with the pip command that fixes it, unless TensorFlow matches TF_REQUIREMENT."""
    try:
        import tensorflow as tf
    except ImportError as e:
        raise ImportError(
            f"tf_lora needs TensorFlow ({TF_REQUIREMENT}): pip install '{TF_REQUIREMENT}'"
        ) from e
    if not tf_version_supported(tf.__version__):
        raise ImportError(
            f"tf_lora {__version__} needs {TF_REQUIREMENT}, found TensorFlow {tf.__version__}. "
            f"Install a matching TensorFlow: pip install '{TF_REQUIREMENT}'"
        )
