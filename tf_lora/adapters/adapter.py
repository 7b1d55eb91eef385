"""tf_lora.adapters.Adapter: one LoRA adapter of one layer, in TensorFlow layout."""

import dataclasses
import math

import numpy as np


@dataclasses.dataclass
class Adapter:
    """A LoRA adapter of one layer: the update is `scale * a @ b` on a weight `[in, out]`.

    Attributes:
      a: Down projection `[in, r]` (PEFT's `lora_A.weight` transposed), numpy, the file's dtype.
      b: Up projection `[r, out]` (PEFT's `lora_B.weight` transposed).
      alpha: LoRA alpha.
      use_rslora: Scale `alpha / sqrt(r)` instead of `alpha / r`.
      module: The module (layer) name in the file.
      metadata: Where it came from (format, file, config fields).
    """

    a: np.ndarray
    b: np.ndarray
    alpha: float
    use_rslora: bool = False
    module: str = ""
    metadata: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.a.ndim != 2 or self.b.ndim != 2 or self.a.shape[1] != self.b.shape[0]:
            raise ValueError(
                f"Adapter {self.module!r}: expected a [in, r] and b [r, out], "
                f"got {self.a.shape} and {self.b.shape}"
            )
        if self.a.shape[1] < 1:
            raise ValueError(
                f"Adapter {self.module!r}: rank must be >= 1, got a {self.a.shape}, b {self.b.shape}"
            )
        if not math.isfinite(float(self.alpha)):
            raise ValueError(f"Adapter {self.module!r}: alpha must be finite, got {self.alpha}")

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)
