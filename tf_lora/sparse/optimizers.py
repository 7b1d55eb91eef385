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
