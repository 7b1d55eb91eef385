"""LoRA adapters in files: PEFT (and later kohya) safetensors formats, in TensorFlow layout."""

from tf_lora.adapters.adapter import Adapter
from tf_lora.adapters.peft import load_peft, save_peft

__all__ = ["Adapter", "load_peft", "save_peft"]
