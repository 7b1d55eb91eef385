"""tf_lora's version and the TensorFlow it needs: the one place both are declared.

Read by pip_package/setup.py (wheel metadata), by tools/configure.py (build) and by tf_lora's import
check. TensorFlow has no ABI stability across minor versions, so one minor is pinned.
"""

__version__ = "0.1.0"

# The supported TensorFlow minor, as [MIN, MAX) release tuples.
TF_MIN_VERSION = (2, 21)
TF_MAX_VERSION = (2, 22)
TF_REQUIREMENT = "tensorflow>={}.{},<{}.{}".format(*TF_MIN_VERSION, *TF_MAX_VERSION)


def release_tuple(version):
    """(major, minor) of a version string such as '2.21.0' or '2.21.0rc1'."""
    parts = version.split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        raise ValueError(f"not a TensorFlow version: {version!r}") from None


def tf_version_supported(version):
    """Whether TensorFlow `version` lies in [TF_MIN_VERSION, TF_MAX_VERSION)."""
    return TF_MIN_VERSION <= release_tuple(version) < TF_MAX_VERSION
