"""LoRA adapters in files: PEFT and kohya safetensors formats, in TensorFlow layout."""

from tf_lora.adapters.adapter import Adapter, AdapterSet
from tf_lora.adapters.keras_lora import load_keras_lora, save_keras_lora
from tf_lora.adapters.kohya import load_kohya, save_kohya
from tf_lora.adapters.model_apply import ApplyReport, apply, from_model
from tf_lora.adapters.peft import load_peft, save_peft
from tf_lora.adapters.registry import Registry

__all__ = [
    "Adapter",
    "AdapterSet",
    "ApplyReport",
    "Registry",
    "apply",
    "from_model",
    "load_keras_lora",
    "load_kohya",
    "load_peft",
    "save_keras_lora",
    "save_kohya",
    "save_peft",
]
