"""PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors) to and from tf_lora.adapters.Adapter.

PEFT stores `base_model.model.<module>.lora_A.weight` `[r, in]` and `.lora_B.weight` `[out, r]` (PyTorch
layout); tf_lora holds `a = A^T` `[in, r]` and `b = B^T` `[r, out]`. The scale is `lora_alpha / r`, or
`lora_alpha / sqrt(r)` with `use_rslora`, with per-module `rank_pattern` and `alpha_pattern`.
"""

import json
import math
import os
import re
import shutil
import tempfile

import numpy as np

from tf_lora.adapters.adapter import Adapter, AdapterSet
from tf_lora.adapters.safetensors_io import check_sha256, read_safetensors, write_safetensors

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_KEY = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.lora_(?P<embedding>embedding_)?(?P<part>[AB])(\.[^.]+)?(?(embedding)|\.weight)$"
)
_MAGNITUDE = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_magnitude_vector(\.[^.]+)?(\.weight)?$")
# An adapted layer's own bias (bias="lora_only"), or its whole weight (PEFT saves the tables of adapted
# embeddings, save_embedding_layers, in case the vocabulary was resized).
_BASE_LAYER = re.compile(r"^base_model\.model\.(?P<module>.+)\.base_layer\.(?P<param>bias|weight)$")
_FULL = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<param>weight|bias)$")
# PEFT's other adapter kinds, by peft_type: named in the error, never read as LoRA.
_VARIANTS = {
    "LOHA": "LoHa",
    "LOKR": "LoKr",
    "IA3": "IA3",
    "VERA": "VeRA",
    "ADALORA": "AdaLoRA",
    "BOFT": "BOFT",
    "OFT": "OFT",
    "FOURIERFT": "FourierFT",
    "LN_TUNING": "LayerNorm tuning",
    "PROMPT_TUNING": "prompt tuning",
    "PREFIX_TUNING": "prefix tuning",
    "P_TUNING": "P-tuning",
    "XLORA": "X-LoRA",
    "HRA": "HRA",
    "VBLORA": "VB-LoRA",
    "RANDLORA": "RandLoRA",
    "BONE": "Bone",
    "MISS": "MiSS",
}


def load_peft(path, sha256=None, allow_nonfinite=False) -> AdapterSet:
    """Reads a PEFT LoRA adapter directory: `{module name: Adapter}` (an AdapterSet).

    The whole LoRA file format: DoRA (`use_dora`: each Adapter's `magnitude`), rank/alpha patterns,
    rsLoRA, the adapted layers' trained biases (`bias="lora_only"`: each Adapter's `bias`), and what the
    file replaces whole (`modules_to_save`, and with `bias="all"` the other layers' biases), in the
    AdapterSet's `replacements`.

    Args:
      path: The directory PEFT's `save_pretrained` wrote (or its adapter_model.safetensors or
        adapter_config.json: the directory holding it is read).
      sha256: When given, the hex SHA-256 adapter_model.safetensors must have.
      allow_nonfinite: Accept NaN or Inf weights (refused by default).

    Raises:
      ValueError: a missing or inconsistent config field, a file that is not valid safetensors, a checksum
        that does not match, keys that are not LoRA A/B pairs, ranks that disagree between A, B and the
        config, non-finite weights, `target_modules` that match none of the weights, DoRA without its
        magnitudes (or magnitudes without `use_dora`), or another PEFT adapter kind (LoHa, LoKr, IA3, VeRA...,
        named). Nothing is returned then.
    """
    path = _adapter_dir(path)
    config = _read_config(path)
    weights_path = os.path.join(path, WEIGHTS)
    if not os.path.exists(weights_path) and os.path.exists(os.path.join(path, "adapter_model.bin")):
        raise ValueError(
            f"load_peft: {path} holds adapter_model.bin (PEFT's save_pretrained(..., "
            "safe_serialization=False): a PyTorch pickle, which tf_lora does not read since loading one can "
            f"run code) and no {WEIGHTS}: save it again with PEFT's default safe_serialization=True"
        )
    if sha256 is not None:
        check_sha256(weights_path, sha256)
    tensors = read_safetensors(weights_path)
    pairs, magnitudes, biases, replacements, embeddings, base_weights = {}, {}, {}, {}, set(), {}
    saved = config.get("modules_to_save") or []
    for key, value in tensors.items():
        kind, match = _classify(key)
        if match is None:
            raise ValueError(f"load_peft: {weights_path}: key {key!r} is not a LoRA A or B weight")
        module = match["module"]
        if kind == "ab":
            pairs.setdefault(module, {})[match["part"]] = value.numpy()
            if match["embedding"]:
                embeddings.add(module)
        elif kind == "m":
            magnitudes[module] = value.numpy()
        elif kind == "base" and match["param"] == "bias":
            biases[module] = value.numpy()
        elif kind == "base":
            base_weights[module] = value.numpy()
        elif any(module == m or module.endswith("." + m) for m in saved) or (
            match["param"] == "bias" and config.get("bias") == "all"
        ):
            replacements.setdefault(module, {})[match["param"]] = value.numpy()  # the file's layout
        else:
            raise ValueError(
                f"load_peft: {weights_path}: key {key!r} is a whole {match['param']} of {module!r}, which "
                f"the config neither saves (modules_to_save {saved}) nor trains (bias {config.get('bias')!r})"
            )
    for module, array in base_weights.items():
        replacements.setdefault(module, {})["weight"] = array
    if config.get("use_dora") and (set(pairs) - set(magnitudes)):
        raise ValueError(
            f"load_peft: {path}: a DoRA adapter (use_dora: true) without the lora_magnitude_vector weights "
            f"DoRA needs for {sorted(set(pairs) - set(magnitudes))[:5]}: the file is inconsistent; loading "
            "it as plain LoRA would give wrong outputs"
        )
    if magnitudes and not config.get("use_dora"):
        raise ValueError(
            f"load_peft: {path}: lora_magnitude_vector weights (DoRA) but use_dora is not true: the file is "
            "inconsistent"
        )
    if pairs and not any(_targets(config.get("target_modules"), module) for module in pairs):
        raise ValueError(
            f"load_peft: {path}: target_modules {config.get('target_modules')!r} match none of the adapted "
            f"modules {sorted(pairs)[:10]}: the config and the weights disagree"
        )
    problems, adapters = [], {}
    for module, parts in sorted(pairs.items()):
        if set(parts) != {"A", "B"}:
            problems.append(f"{module}: has lora_{''.join(parts)} only")
            continue
        a_t, b_t = parts["A"], parts["B"]  # [r, in], [out, r]
        if a_t.ndim == 4:  # 1x1 convolutions
            a_t, b_t = a_t.reshape(a_t.shape[:2]), b_t.reshape(b_t.shape[:2])
        r = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        if a_t.ndim != 2 or b_t.ndim != 2 or a_t.shape[0] != b_t.shape[1]:
            problems.append(
                f"{module}: lora_A {a_t.shape} and lora_B {b_t.shape} are not [r, in] and [out, r]"
            )
            continue
        if a_t.shape[0] != r:
            problems.append(f"{module}: rank {a_t.shape[0]} in the weights, {r} in the config")
            continue
        if not allow_nonfinite and not (np.all(np.isfinite(a_t)) and np.all(np.isfinite(b_t))):
            problems.append(f"{module}: NaN or Inf weights (pass allow_nonfinite=True to accept them)")
            continue
        adapters[module] = Adapter(
            a=np.ascontiguousarray(a_t.T),
            b=np.ascontiguousarray(b_t.T),
            alpha=float(_pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])),
            use_rslora=bool(config.get("use_rslora", False)),
            module=module,
            magnitude=magnitudes.get(module),
            bias=biases.get(module),
            metadata={
                "format": "peft",
                "path": os.path.abspath(path),
                "fan_in_fan_out": bool(config.get("fan_in_fan_out", False)),
                "embedding": module in embeddings,
            },
        )
    stray = sorted((set(magnitudes) | set(biases)) - set(adapters) - {p for p in problems})
    if stray and not problems:
        problems.append(f"DoRA magnitudes or biases of modules without LoRA weights: {stray}")
    if problems:
        raise ValueError(f"load_peft: {weights_path}: " + "; ".join(problems))
    if not adapters:
        raise ValueError(f"load_peft: {weights_path} holds no LoRA weights")
    return AdapterSet(adapters, replacements, config)


def save_peft(adapters: dict, path, base_model_name_or_path=None, overwrite=False):
    """Writes `{module name: Adapter}` as a PEFT LoRA adapter directory that PEFT itself loads: DoRA
    magnitudes, trained biases and (from an AdapterSet) `replacements` as `modules_to_save` included.

    The most common rank and alpha become `r` and `lora_alpha`; the others go to `rank_pattern` and
    `alpha_pattern`. Tensors keep their dtypes. The directory appears complete or not at all.
    """
    if not adapters:
        raise ValueError("save_peft: no adapters")
    rslora = {adapter.use_rslora for adapter in adapters.values()}
    if len(rslora) != 1:
        raise ValueError("save_peft: adapters mix use_rslora True and False; PEFT has one flag per file")
    dora = {adapter.use_dora for adapter in adapters.values()}
    if len(dora) != 1:
        raise ValueError("save_peft: adapters mix DoRA and plain LoRA; PEFT has one use_dora flag per file")
    replacements = getattr(adapters, "replacements", {})
    saved = sorted(m for m, r in replacements.items() if "weight" in r)
    other_biases = any("weight" not in r for r in replacements.values())
    has_bias = other_biases or any(adapter.bias is not None for adapter in adapters.values())
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"save_peft: {path} exists (pass overwrite=True to replace it)")
    ranks = [adapter.rank for adapter in adapters.values()]
    alphas = [adapter.alpha for adapter in adapters.values()]
    r, alpha = max(set(ranks), key=ranks.count), max(set(alphas), key=alphas.count)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": rslora.pop(),
        "target_modules": sorted(adapters),
        "rank_pattern": {m: x.rank for m, x in adapters.items() if x.rank != r},
        "alpha_pattern": {m: x.alpha for m, x in adapters.items() if x.alpha != alpha},
        "lora_dropout": 0.0,
        "bias": "all" if other_biases else ("lora_only" if has_bias else "none"),
        "use_dora": dora.pop(),
        "modules_to_save": saved or None,
        "fan_in_fan_out": any(x.metadata.get("fan_in_fan_out", False) for x in adapters.values()),
        "inference_mode": True,
        "init_lora_weights": True,
    }
    tensors = {}
    for module, adapter in adapters.items():
        if adapter.metadata.get("embedding"):  # PEFT's Embedding layer: lora_embedding_A [r, vocab]
            tensors[f"base_model.model.{module}.lora_embedding_A"] = adapter.a.T
            tensors[f"base_model.model.{module}.lora_embedding_B"] = adapter.b.T
        else:
            tensors[f"base_model.model.{module}.lora_A.weight"] = adapter.a.T
            tensors[f"base_model.model.{module}.lora_B.weight"] = adapter.b.T
        if adapter.magnitude is not None:
            tensors[f"base_model.model.{module}.lora_magnitude_vector"] = adapter.magnitude
        if adapter.bias is not None:
            tensors[f"base_model.model.{module}.base_layer.bias"] = adapter.bias
    for module, parts in replacements.items():  # in the file's layout already
        for param, array in parts.items():
            tensors[f"base_model.model.{module}.{param}"] = array
    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tf_lora_peft_", dir=parent)
    try:
        with open(os.path.join(staging, CONFIG), "w") as f:
            json.dump(config, f, indent=2)
        write_safetensors(tensors, os.path.join(staging, WEIGHTS))
        if os.path.exists(path):
            shutil.rmtree(path)
        os.rename(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _classify(key):
    """(kind, match) of a PEFT file key: a LoRA A/B weight ("ab"), a DoRA magnitude ("m"), an adapted
    layer's bias ("bias"), a whole weight or bias ("full"); (None, None) for none of them."""
    for pattern, kind in ((_KEY, "ab"), (_MAGNITUDE, "m"), (_BASE_LAYER, "base"), (_FULL, "full")):
        match = pattern.match(key)
        if match is not None:
            return kind, match
    return None, None


def _adapter_dir(path):
    """The adapter directory for `path`: itself, or the directory of a file PEFT wrote in it."""
    path = os.fspath(path)
    if os.path.isfile(path):
        if os.path.basename(path) in (CONFIG, WEIGHTS):
            return os.path.dirname(os.path.abspath(path))
        raise ValueError(
            f"load_peft: {path} is a file; pass the directory PEFT's save_pretrained wrote (holding {CONFIG} "
            f"and {WEIGHTS}). For a kohya .safetensors file use load_kohya"
        )
    return path


def _targets(target_modules, module):
    """Whether PEFT's target_modules select `module`: a string is a regex matching the whole name; a list
    holds names matching the whole name or its last dotted parts. No target_modules: every module."""
    if not target_modules or target_modules == "all-linear":
        return True
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module) is not None
    return any(module == t or module.endswith("." + t) for t in target_modules)


def _read_config(path):
    config_path = os.path.join(path, CONFIG)
    try:
        with open(config_path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"load_peft: no {CONFIG} in {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"load_peft: {config_path} is not valid JSON: {e}") from None
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        kind = _VARIANTS.get(str(peft_type).upper())
        raise ValueError(
            f"load_peft: {config_path}: "
            + (
                f"a {kind} adapter (peft_type {peft_type!r})"
                if kind
                else f"peft_type {peft_type!r} is not LORA"
            )
            + "; tf_lora reads LoRA adapters (with DoRA, rsLoRA, rank/alpha patterns), not this kind"
        )
    missing = [k for k in ("r", "lora_alpha") if not isinstance(config.get(k), int | float)]
    if missing:
        raise ValueError(f"load_peft: {config_path}: missing or non-numeric {missing}")
    if (
        isinstance(config["r"], bool)
        or not math.isfinite(config["r"])
        or config["r"] < 1
        or config["r"] != int(config["r"])
    ):
        raise ValueError(f"load_peft: {config_path}: r must be an integer >= 1, got {config['r']}")
    problems = _config_problems(config)
    if problems:
        raise ValueError(f"load_peft: {config_path}: " + "; ".join(problems))
    return config


# init_lora_weights values that leave the base weights as they are (True/False too): any other one (PiSSA,
# OLoRA, CorDA, LoftQ, LoRA-GA...) subtracts the initial adapter from the base weights when PEFT creates the
# adapter, so the file's A and B apply to that changed base.
_BASE_KEEPING_INITS = ("gaussian", "eva", "orthogonal", "mica")
# Config fields that change what the adapter computes, which tf_lora does not compute: (field, what it is).
_UNSUPPORTED = (
    ("alora_invocation_tokens", "an activated LoRA (aLoRA: applied only from its invocation tokens on)"),
    ("lora_bias", "a bias on lora_B (lora_bias)"),
    ("trainable_token_indices", "trainable token embeddings (trainable_token_indices)"),
    ("layer_replication", "replicated layers (layer_replication)"),
    ("use_qalora", "QA-LoRA's pooled inputs (use_qalora)"),
    ("use_bdlora", "block-diagonal LoRA (use_bdlora)"),
    ("arrow_config", "Arrow routing among adapters (arrow_config)"),
    ("kasa_config", "KaSA's singular-value adaptation (kasa_config)"),
    ("monteclora_config", "MonteCLoRA's sampled adapters (monteclora_config)"),
)


def _config_problems(config):
    """What of a LoRA config tf_lora cannot compute: refused rather than loaded as a plain LoRA adapter, whose
    outputs would be silently wrong."""
    problems = []
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _BASE_KEEPING_INITS:
        problems.append(
            f"init_lora_weights {init!r} changes the base model's weights when PEFT creates the adapter, so "
            "these A and B apply to that changed base, not to the model's own weights; convert the adapter "
            "in PEFT to a plain LoRA adapter of the original base (save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...)) and load that"
        )
    for field, what in _UNSUPPORTED:
        if config.get(field):
            problems.append(f"{what}, which tf_lora does not compute")
    return problems


def _pattern_value(patterns, module, default):
    """PEFT's rank_pattern / alpha_pattern: a key matches a module whose name ends with it, the key as a
    regex; grouped, as PEFT groups it, so that every alternative of `q_proj|v_proj` takes the prefix."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?(?:{key})", module):
            return value
    return default
