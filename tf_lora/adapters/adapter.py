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
      magnitude: DoRA's magnitude vector `[out]` (PEFT's `lora_magnitude_vector`), or None for plain LoRA.
        With it the layer computes `magnitude / ||w + scale * a @ b|| * (x @ (w + scale * a @ b))`, the norm
        of each output column of the `[in, out]` weight, as PEFT's DoRA does.
      bias: The layer's trained bias `[out]` (PEFT's `bias="lora_only"` or `"all"`), or None.
    """

    a: np.ndarray
    b: np.ndarray
    alpha: float
    use_rslora: bool = False
    module: str = ""
    metadata: dict = dataclasses.field(default_factory=dict)
    magnitude: np.ndarray = None
    bias: np.ndarray = None

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
        if self.magnitude is not None and np.shape(self.magnitude) != (self.b.shape[1],):
            raise ValueError(
                f"Adapter {self.module!r}: the DoRA magnitude must be [out] = [{self.b.shape[1]}], "
                f"got {np.shape(self.magnitude)}"
            )
        if self.bias is not None and np.shape(self.bias) != (self.b.shape[1],):
            raise ValueError(
                f"Adapter {self.module!r}: the bias must be [out] = [{self.b.shape[1]}], "
                f"got {np.shape(self.bias)}"
            )
        if not math.isfinite(float(self.alpha)):
            raise ValueError(f"Adapter {self.module!r}: alpha must be finite, got {self.alpha}")

    @property
    def use_dora(self) -> bool:
        return self.magnitude is not None

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def linear_layout(weight, as_is=False):
    """A whole weight between TensorFlow's `[in, out]` and a PyTorch Linear's `[out, in]`: the transpose
    (its own inverse, so both ways). `as_is` for what both hold alike (an embedding table, GPT-2's Conv1D);
    anything not 2-D is as it is."""
    weight = np.asarray(weight)
    return weight if as_is or weight.ndim != 2 else weight.T


class AdapterSet(dict):
    """`{module name: Adapter}` as read from an adapter file, with what the file holds beside the adapters.

    Attributes:
      replacements: `{module name: {"weight": ..., "bias": [out]}}`: layers the file replaces whole (PEFT's
        `modules_to_save`, such as a classifier head or an embedding table) and biases trained outside the
        adapted layers (`bias="all"`). A weight is held in the file's (PyTorch) layout, since only the layer
        it lands on says which that is: a Linear's `[out, in]` (the transpose of TensorFlow's `[in, out]`),
        an embedding table's `[vocab, dim]` (as Keras's), and with the config's `fan_in_fan_out` (GPT-2's
        Conv1D) `[in, out]`.
      config: The file's configuration (PEFT's adapter_config.json), or {}.
    """

    def __init__(self, adapters=(), replacements=None, config=None):
        super().__init__(adapters)
        self.replacements = dict(replacements or {})
        self.config = dict(config or {})
