"""Optimizers of a tf_lora.SparseTable, applied by `push` to the rows of the ids pushed.

Hyper-parameters follow Keras's optimizers of the same name. `learning_rate` may be a float, a scalar
tensor or a `tf.Variable` (read at each push, for schedules).
"""

import dataclasses
from typing import Any


@dataclasses.dataclass
class SGD:
    """w -= learning_rate * g."""

    learning_rate: Any = 0.01

    def attrs(self):
        return {"optimizer": "sgd"}


@dataclasses.dataclass
class Adagrad:
    """acc += g^2; w -= learning_rate * g / sqrt(acc + epsilon), as Keras 3; acc starts at
    initial_accumulator_value."""

    learning_rate: Any = 0.001
    initial_accumulator_value: float = 0.1
    epsilon: float = 1e-7

    def attrs(self):
        return {
            "optimizer": "adagrad",
            "initial_accumulator": self.initial_accumulator_value,
            "epsilon": self.epsilon,
        }


@dataclasses.dataclass
class Adam:
    """Adam with bias correction, as Keras 3 computes it, on the rows pushed (lazily: a key's moments move
    when it is pushed, and its bias correction counts its own updates)."""

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
class Ftrl:
    """FTRL-Proximal with l1/l2 regularization, as Keras 3 computes it, on the rows pushed."""

    learning_rate: Any = 0.001
    learning_rate_power: float = -0.5
    initial_accumulator_value: float = 0.1
    l1_regularization_strength: float = 0.0
    l2_regularization_strength: float = 0.0

    def attrs(self):
        return {
            "optimizer": "ftrl",
            "lr_power": self.learning_rate_power,
            "initial_accumulator": self.initial_accumulator_value,
            "l1": self.l1_regularization_strength,
            "l2": self.l2_regularization_strength,
        }
