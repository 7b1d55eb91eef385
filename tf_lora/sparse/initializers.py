"""Initializers of new rows of a tf_lora.SparseTable: each row is a pure function of (seed, id)."""

import dataclasses
import math
import numbers
import random


def _check(owner, **fields):
    """Each field a finite number (a seed: an int in [0, 2^63)); a table would keep NaN or Inf rows."""
    for name, value in fields.items():
        if name == "seed":
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < 2**63:
                raise ValueError(f"{owner}: seed must be an int in [0, 2^63), got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"{owner}: {name} must be a finite number, got {value!r}")


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

    def __post_init__(self):
        _check(type(self).__name__, minval=self.minval, maxval=self.maxval, seed=self.seed)
        if self.minval > self.maxval:
            raise ValueError(f"RandomUniform: minval {self.minval} > maxval {self.maxval}")

    def attrs(self):
        return {"initializer": self._kind, "init_a": self.minval, "init_b": self.maxval, "seed": self.seed}


@dataclasses.dataclass(frozen=True)
class RandomNormal:
    """New rows are normal with `mean` and `stddev`."""

    mean: float = 0.0
    stddev: float = 0.05
    seed: int = 0
    _kind = "normal"

    def __post_init__(self):
        _check(type(self).__name__, mean=self.mean, stddev=self.stddev, seed=self.seed)
        if self.stddev < 0:
            raise ValueError(f"{type(self).__name__}: stddev must be >= 0, got {self.stddev}")

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
        # An unseeded Keras initializer draws differently for every layer: so does this, never the same
        # rows for two tables.
        if not isinstance(seed, int) or isinstance(seed, bool):
            seed = new_seed()
        fields["seed"] = seed
    return _KERAS[name](**fields)


def new_seed():
    """A seed for a table whose user gave none, kept in its layer's config: drawn from Python's `random`,
    so that `keras.utils.set_random_seed` makes it reproducible, and different for every table (two
    tables with one seed start every id with the same row)."""
    return random.getrandbits(31)
