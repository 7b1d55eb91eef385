"""kohya-style LoRA files (one .safetensors) to and from tf_lora.adapters.Adapter.

Keys: `<name>.lora_down.weight` `[r, in]` (or `[r, in, 1, 1]` for 1x1 convolutions), `<name>.lora_up.weight`
`[out, r]` (or `[out, r, 1, 1]`) and an optional scalar `<name>.alpha`; a missing or zero alpha means
alpha = r. `<name>` is the module path with `_` for `.` behind a prefix (`lora_unet_...`, `lora_te_...`):
ambiguous to invert, so adapters are keyed by the file's names (map them to layers when applying).
"""

import os
import re
import tempfile

import numpy as np

from tf_lora.adapters.adapter import Adapter
from tf_lora.adapters.safetensors_io import check_sha256, read_safetensors, write_safetensors

_KEY = re.compile(r"^(?P<name>.+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$")


def _kohya_file(path):
    """A kohya LoRA is one .safetensors file; a directory holding exactly one stands for it."""
    if not os.path.isdir(path):
        return path
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise ValueError(f"load_kohya: {path} is a PEFT adapter directory; use load_peft")
    if len(files) != 1:
        raise ValueError(
            f"load_kohya: {path} is a directory holding {len(files)} .safetensors files {files[:10]}; "
            "pass the kohya LoRA file itself"
        )
    return os.path.join(path, files[0])


def load_kohya(path, sha256=None, allow_nonfinite=False) -> dict:
    """Reads a kohya LoRA .safetensors file (or a directory holding only it): `{name: Adapter}` (alpha = r
    when missing or 0).

    Raises:
      ValueError: not valid safetensors, a checksum that does not match, keys that are not kohya LoRA keys,
        pairs that are incomplete or of mismatched rank, convolutions larger than 1x1, or non-finite weights.
    """
    path = _kohya_file(os.fspath(path))
    if sha256 is not None:
        check_sha256(path, sha256)
    tensors = read_safetensors(path)
    parts = {}
    for key, value in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise ValueError(f"load_kohya: {path}: key {key!r} is not a kohya LoRA key")
        parts.setdefault(match["name"], {})[match["part"]] = value.numpy()
    problems, adapters = [], {}
    for name, p in sorted(parts.items()):
        if "lora_down.weight" not in p or "lora_up.weight" not in p:
            problems.append(f"{name}: needs both lora_down.weight and lora_up.weight")
            continue
        down, up = p["lora_down.weight"], p["lora_up.weight"]
        if down.ndim == 4 and down.shape[2:] == (1, 1) and up.ndim == 4 and up.shape[2:] == (1, 1):
            down, up = down[:, :, 0, 0], up[:, :, 0, 0]
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            problems.append(
                f"{name}: lora_down {down.shape} and lora_up {up.shape} are not [r, in] and [out, r] "
                "(or 1x1 convolutions)"
            )
            continue
        if not allow_nonfinite and not (np.all(np.isfinite(down)) and np.all(np.isfinite(up))):
            problems.append(f"{name}: NaN or Inf weights (pass allow_nonfinite=True to accept them)")
            continue
        rank = down.shape[0]
        alpha = float(np.asarray(p["alpha"], np.float64).reshape(-1)[0]) if "alpha" in p else 0.0
        adapters[name] = Adapter(
            a=np.ascontiguousarray(down.T),
            b=np.ascontiguousarray(up.T),
            alpha=alpha if alpha != 0 else float(rank),
            module=name,
            metadata={"format": "kohya", "path": os.path.abspath(path)},
        )
    if problems:
        raise ValueError(f"load_kohya: {path}: " + "; ".join(problems))
    if not adapters:
        raise ValueError(f"load_kohya: {path} holds no LoRA weights")
    return adapters


def save_kohya(adapters: dict, path, overwrite=False):
    """Writes `{name: Adapter}` as a kohya LoRA .safetensors file (alpha stored as a float32 scalar).

    rsLoRA scaling has no kohya encoding: its alpha is rescaled so that alpha / r gives the same scale. The
    file appears complete or not at all.
    """
    path = os.fspath(path)
    if not adapters:
        raise ValueError("save_kohya: no adapters")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"save_kohya: {path} exists (pass overwrite=True to replace it)")
    tensors = {}
    for name, adapter in adapters.items():
        tensors[f"{name}.lora_down.weight"] = adapter.a.T
        tensors[f"{name}.lora_up.weight"] = adapter.b.T
        tensors[f"{name}.alpha"] = np.array(adapter.scale * adapter.rank, np.float32)
    fd, staging = tempfile.mkstemp(prefix=".tf_lora_kohya_", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        write_safetensors(tensors, staging)
        os.replace(staging, path)
    except BaseException:
        if os.path.exists(staging):
            os.remove(staging)
        raise
