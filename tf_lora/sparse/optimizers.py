"""Optimizers of a tf_lora.SparseTable, applied by `push` to the rows of the ids pushed.

Hyper-parameters follow Keras's optimizers of the same name. `learning_rate` may be a non-negative number,
a scalar tensor or `tf.Variable` (read at each push), or a `keras.optimizers.schedules.LearningRateSchedule`
(followed at the step of the Keras optimizer that applies the gradients). `from_keras` translates Keras's
SGD, Adagrad, Adam and Ftrl.
"""

import dataclasses
import math
import numbers
from typing import Any

import keras
import tensorflow as tf

LearningRateSchedule = keras.optimizers.schedules.LearningRateSchedule


def _check_number(owner, name, value, low=0.0, high=math.inf, ends="[]"):
    """`ends` says which ends of the interval are in it: "[]", "[)" or "(]"."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a number, got {value!r}")
    above = value >= low if ends[0] == "[" else value > low
    below = value <= high if ends[1] == "]" else value < high
    if not (math.isfinite(value) and above and below):
        raise ValueError(
            f"{owner}: {name} must be finite and in {ends[0]}{low}, {high}{ends[1]}, got {value}"
        )


class _Checked:
    """Validates the hyper-parameters when an optimizer is made: a learning rate that is not a number, a
    tensor or a schedule (`SGD("0.1")`), or a negative one, is an error here rather than a poisoned table."""

    _bounds: dict = {}

    def __post_init__(self):
        owner = type(self).__name__
        lr = self.learning_rate
        if not isinstance(lr, tf.Tensor | tf.Variable | keras.Variable | LearningRateSchedule):
            _check_number(owner, "learning_rate", lr)
        for name, bounds in self._bounds.items():
            _check_number(owner, name, getattr(self, name), *bounds)
        self._check_no_nan()

    def _check_no_nan(self):
        """Refuses settings under which a zero gradient makes the update 0 / 0 (Keras's optimizers give NaN
        there; a table would keep it)."""

    def learning_rate_at(self, iterations):
        """The learning rate (float32 scalar) at step `iterations` (a schedule is evaluated there)."""
        lr = self.learning_rate
        if isinstance(lr, LearningRateSchedule):
            lr = lr(iterations)
        return tf.cast(tf.convert_to_tensor(lr), tf.float32)


@dataclasses.dataclass
class SGD(_Checked):
    """w -= learning_rate * g."""

    learning_rate: Any = 0.01

    def attrs(self):
        return {"optimizer": "sgd"}


@dataclasses.dataclass
class Adagrad(_Checked):
    """acc += g^2; w -= learning_rate * g / sqrt(acc + epsilon), as Keras 3; acc starts at
    initial_accumulator_value."""

    _bounds = {"initial_accumulator_value": (0.0, math.inf), "epsilon": (0.0, math.inf)}

    learning_rate: Any = 0.001
    initial_accumulator_value: float = 0.1
    epsilon: float = 1e-7

    def _check_no_nan(self):
        if self.initial_accumulator_value == 0 and self.epsilon == 0:
            raise ValueError(
                "Adagrad: initial_accumulator_value and epsilon are both 0: a zero gradient would then "
                "update by 0 / sqrt(0) = NaN; make one of them > 0"
            )

    def attrs(self):
        return {
            "optimizer": "adagrad",
            "initial_accumulator": self.initial_accumulator_value,
            "epsilon": self.epsilon,
        }


@dataclasses.dataclass
class Adam(_Checked):
    """Adam with bias correction, as Keras 3 computes it, on the rows pushed (lazily: a key's moments move
    when it is pushed, and its bias correction counts its own updates)."""

    # beta = 1 makes the bias correction divide by 1 - beta^t = 0; epsilon = 0 a zero gradient 0 / 0.
    _bounds = {"beta_1": (0.0, 1.0, "[)"), "beta_2": (0.0, 1.0, "[)"), "epsilon": (0.0, math.inf, "(]")}

    learning_rate: Any = 0.001
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-7

    def attrs(self):
        return {
            "optimizer": "adam",
            "beta_1": self.beta_1,
            "beta_2": self.beta_2,
            # In double precision, as Keras computes them, then rounded to float32.
            "one_minus_beta_1": 1 - self.beta_1,
            "one_minus_beta_2": 1 - self.beta_2,
            "epsilon": self.epsilon,
        }


@dataclasses.dataclass
class Ftrl(_Checked):
    """FTRL-Proximal with l1/l2 regularization, as Keras 3 computes it, on the rows pushed."""

    _bounds = {
        "learning_rate_power": (-math.inf, 0.0),
        "initial_accumulator_value": (0.0, math.inf),
        "l1_regularization_strength": (0.0, math.inf),
        "l2_regularization_strength": (0.0, math.inf),
    }

    learning_rate: Any = 0.001
    learning_rate_power: float = -0.5
    initial_accumulator_value: float = 0.1
    l1_regularization_strength: float = 0.0
    l2_regularization_strength: float = 0.0

    def _check_no_nan(self):
        if self.initial_accumulator_value == 0 and self.l2_regularization_strength == 0:
            raise ValueError(
                "Ftrl: initial_accumulator_value and l2_regularization_strength are both 0: a zero gradient "
                "on a new row would then update it by 0 / 0 = NaN; make one of them > 0"
            )

    def attrs(self):
        return {
            "optimizer": "ftrl",
            "lr_power": self.learning_rate_power,
            "initial_accumulator": self.initial_accumulator_value,
            "l1": self.l1_regularization_strength,
            "l2": self.l2_regularization_strength,
        }


_KERAS = {"SGD": SGD, "Adagrad": Adagrad, "Adam": Adam, "Ftrl": Ftrl}


def from_keras(optimizer):
    """The tf_lora optimizer computing what Keras `optimizer` (SGD, Adagrad, Adam or Ftrl) computes on a
    dense embedding, with its learning rate (a schedule stays a schedule). What tf_lora's have no equivalent
    of (momentum, Nesterov, AMSGrad, FTRL's beta or l2 shrinkage) is an error, as is another optimizer, and
    per-optimizer clipping or weight decay: a table's gradients are clipped by the model's optimizer."""
    name = type(optimizer).__name__
    if name not in _KERAS or not isinstance(optimizer, keras.optimizers.Optimizer):
        raise TypeError(
            "a table optimizer must be a tf_lora.sparse_optimizers object (SGD, Adagrad, Adam, Ftrl) or "
            f"Keras's SGD, Adagrad, Adam or Ftrl; got {name}"
        )
    config = optimizer.get_config()
    unsupported = {
        "SGD": {"momentum": 0.0, "nesterov": False},
        "Adam": {"amsgrad": False},
        "Ftrl": {"beta": 0.0, "l2_shrinkage_regularization_strength": 0.0},
    }.get(name, {})
    unsupported.update(
        {
            "clipnorm": None,
            "clipvalue": None,
            "global_clipnorm": None,
            "weight_decay": None,
            "use_ema": False,
            "loss_scale_factor": None,
            "gradient_accumulation_steps": None,
        }
    )
    for key, default in unsupported.items():
        if config.get(key) not in (None, default, 0):
            raise ValueError(
                f"tf_lora.sparse_optimizers.{name} has no {key} (Keras's {name} has {key}={config[key]}); "
                "clipping, loss scaling and accumulation of a table's gradients come from the model's "
                "optimizer"
            )
    lr = optimizer._learning_rate  # noqa: SLF001 - the schedule itself, where Keras's property gives a value
    if not isinstance(lr, LearningRateSchedule):
        lr = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
    # tf_lora's fields carry Keras's names.
    cls = _KERAS[name]
    fields = {f.name: config[f.name] for f in dataclasses.fields(cls) if f.name != "learning_rate"}
    return cls(learning_rate=lr, **fields)


def resolve(optimizer, default):
    """A table optimizer from what a user passed: tf_lora's, Keras's (translated), or None (`default`)."""
    if optimizer is None:
        return default
    if isinstance(optimizer, _Checked):
        return optimizer
    return from_keras(optimizer)
