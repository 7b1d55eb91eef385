"""Initializers of new rows of a tf_lora.SparseTable: each row is a pure function of (seed, id)."""

import dataclasses


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
