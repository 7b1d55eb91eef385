"""Initializers of new rows of a tf_lora.SparseTable: each row is a pure function of (seed, id)."""

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class Zeros:
    """New rows are zeros."""

    _kind = "zeros"

    def attrs(self):
        return {"initializer": self._kind, "init_a": 0.0, "init_b": 0.0, "seed": 0}


@dataclasses.dataclass(frozen=True)
class RandomUniform:
    """New rows are uniform in [minval, maxval)."""

    minval: float = -0.05
    maxval: float = 0.05
    seed: int = 0
    _kind = "uniform"

    def attrs(self):
        return {"initializer": self._kind, "init_a": self.minval, "init_b": self.maxval, "seed": self.seed}


@dataclasses.dataclass(frozen=True)
class RandomNormal:
    """New rows are normal with `mean` and `stddev`."""

    mean: float = 0.0
    stddev: float = 0.05
    seed: int = 0
    _kind = "normal"

    def attrs(self):
        return {"initializer": self._kind, "init_a": self.mean, "init_b": self.stddev, "seed": self.seed}


@dataclasses.dataclass(frozen=True)
class TruncatedNormal(RandomNormal):
    """New rows are normal with `mean` and `stddev`, values beyond two stddevs drawn again."""

    _kind = "truncated_normal"


_KERAS = {
    "Zeros": Zeros,
    "RandomUniform": RandomUniform,
    "RandomNormal": RandomNormal,
    "TruncatedNormal": TruncatedNormal,
}


def resolve(initializer, default):
    """A table initializer from what a user passed: tf_lora's, Keras's Zeros / RandomUniform / RandomNormal /
    TruncatedNormal (translated: same distribution; rows stay a pure function of (seed, id)), or None."""
    if initializer is None:
        return default
    if isinstance(initializer, Zeros | RandomUniform | RandomNormal):
        return initializer
    import keras  # noqa: PLC0415 - only to translate a Keras initializer

    name = type(initializer).__name__
    if not isinstance(initializer, keras.initializers.Initializer) or name not in _KERAS:
        raise TypeError(
            "a table initializer must be a tf_lora.sparse_initializers object (Zeros, RandomUniform, "
            f"RandomNormal, TruncatedNormal) or the Keras initializer of the same name; got {name}"
        )
    config = dict(initializer.get_config())
    seed = config.pop("seed", None)
    fields = {k: config[k] for k in ("minval", "maxval", "mean", "stddev") if k in config}
    if name != "Zeros":
        # An unseeded Keras initializer draws differently for every layer: so does this (a seed drawn now
        # and kept in the layer's config), never the same rows for two tables.
        if not isinstance(seed, int) or isinstance(seed, bool):
            seed = int.from_bytes(os.urandom(4), "little") >> 1
        fields["seed"] = seed
    return _KERAS[name](**fields)
