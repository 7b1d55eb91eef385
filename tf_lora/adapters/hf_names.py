"""Hugging Face module names <-> keras-hub layer paths, for the architectures keras-hub loads from HF
checkpoints: PEFT adapters trained on a transformers model apply to the keras-hub model, and adapters
trained in Keras export as PEFT files for the transformers model.

No weight needs re-laying out: keras-hub's checkpoint converters reshape each HF `Linear` weight `[out, in]`
into the EinsumDense kernel so that the kernel seen as `[in, out]` (tf_lora.layers.EinsumView) is the HF
weight transposed, the same relation PEFT's `lora_A`/`lora_B` have to tf_lora's `a`/`b`. GPT-2's fused
`c_attn` (query, key and value in one Conv1D) is the one module that is several keras-hub layers: its
adapter splits into three (the same `a`, a third of `b` each), and three adapters fuse back exactly.
"""

import dataclasses
import re

import numpy as np

from tf_lora.adapters.adapter import Adapter, AdapterSet, linear_layout
from tf_lora.layers.kernel_layout import layer_parts
from tf_lora.layers.model_layers import layers_by_path


@dataclasses.dataclass(frozen=True)
class Layout:
    """One architecture: keras-hub backbone classes, HF names of its blocks, and per module the keras-hub
    layers (paths inside block `i`)."""

    backbones: tuple
    hf_block: str  # HF module prefix of block i (as a regex: the prefix before it may vary)
    hf_export: str  # the prefix written on export (the CausalLM model's names)
    keras_block: str
    modules: dict  # HF module under the block -> keras-hub layer(s) under the block
    fan_in_fan_out: bool = False  # GPT-2's Conv1D
    embedding: tuple = ("model.embed_tokens", "token_embedding")  # (HF name as exported, keras-hub layer)


_LLAMA_MODULES = {
    "self_attn.q_proj": "self_attention/query",
    "self_attn.k_proj": "self_attention/key",
    "self_attn.v_proj": "self_attention/value",
    "self_attn.o_proj": "self_attention/attention_output",
    "mlp.gate_proj": "feedforward_gate_dense",
    "mlp.up_proj": "feedforward_intermediate_dense",
    "mlp.down_proj": "feedforward_output_dense",
}
LAYOUTS = (
    Layout(
        ("GPT2Backbone",),
        r"h\.(\d+)",
        "transformer.h.{}",
        "transformer_layer_{}",
        {
            "attn.c_attn": ("self_attention/query", "self_attention/key", "self_attention/value"),
            "attn.c_proj": "self_attention/attention_output",
            "mlp.c_fc": "feedforward_intermediate_dense",
            "mlp.c_proj": "feedforward_output_dense",
        },
        fan_in_fan_out=True,
        embedding=("transformer.wte", "token_embedding"),
    ),
    Layout(
        ("LlamaBackbone", "MistralBackbone", "QwenBackbone", "Qwen3Backbone"),
        r"layers\.(\d+)",
        "model.layers.{}",
        "transformer_layer_{}",
        _LLAMA_MODULES,
    ),
    Layout(
        ("GemmaBackbone",),
        r"layers\.(\d+)",
        "model.layers.{}",
        "decoder_block_{}",
        {
            "self_attn.q_proj": "attention/query",
            "self_attn.k_proj": "attention/key",
            "self_attn.v_proj": "attention/value",
            "self_attn.o_proj": "attention/attention_output",
            "mlp.gate_proj": "ffw_gating",
            "mlp.up_proj": "ffw_gating_2",
            "mlp.down_proj": "ffw_linear",
        },
    ),
)


def find_backbone(model):
    """(layout, path prefix of the backbone inside `model`) for a model holding a keras-hub backbone of a
    known architecture, else (None, None). Classes are recognised by name, so keras-hub is not imported."""
    candidates = [("", model)] + [(path + "/", layer) for path, layer in layers_by_path(model).items()]
    for prefix, layer in candidates:
        names = {cls.__name__ for cls in type(layer).__mro__}
        for layout in LAYOUTS:
            if names & set(layout.backbones):
                return layout, prefix
    return None, None


def _module_pattern(layout):
    suffixes = "|".join(re.escape(m) for m in layout.modules)
    return re.compile(rf"(?:.*\.)?{layout.hf_block}\.({suffixes})")


def to_keras_hub(model, adapters):
    """`(adapters, mapping)` for `apply`: HF module names of a known architecture become keras-hub layer
    paths (GPT-2's c_attn split in three, keyed `module:query` ...), those of the adapters and of the whole
    weights and biases the file replaces (AdapterSet.replacements); other names pass through. (None, None)
    when `model` holds no known keras-hub backbone or no name is an HF one. The block weights the file
    replaces come back as a Linear's `[out, in]` (GPT-2's Conv1D ones transposed), the embedding's as its
    table."""
    layout, prefix = find_backbone(model)
    if layout is None:
        return None, None
    pattern = _module_pattern(layout)
    embedding = re.compile(rf"(?:.*\.)?{re.escape(layout.embedding[0].rsplit('.', 1)[-1])}")

    def where(module):
        """None for a name that is not one of this layout's, else (the keras-hub layer's path and None, or
        the block's path and the layer(s) under it: a path, or GPT-2's fused parts)."""
        match = pattern.fullmatch(module)
        if match is None:
            return (prefix + layout.embedding[1], None) if embedding.fullmatch(module) else None
        return prefix + layout.keras_block.format(match[1]), layout.modules[match[2]]

    out, paths, translated = {}, {}, False
    for module, adapter in adapters.items():
        found = where(module)
        if found is None:
            out[module] = adapter
            continue
        translated, (path, targets) = True, found
        if not isinstance(targets, tuple):
            out[module], paths[module] = adapter, path if targets is None else f"{path}/{targets}"
            continue
        width, rem = divmod(adapter.b.shape[1], len(targets))
        if rem:
            raise ValueError(
                f"{module}: the fused adapter's output ({adapter.b.shape[1]}) does not split into "
                f"{len(targets)} equal parts"
            )
        for i, target in enumerate(targets):
            key = f"{module}:{target.rsplit('/', 1)[-1]}"
            columns = slice(i * width, (i + 1) * width)
            out[key] = dataclasses.replace(
                adapter,
                b=np.ascontiguousarray(adapter.b[:, columns]),
                module=key,
                magnitude=None if adapter.magnitude is None else adapter.magnitude[columns],
                bias=None if adapter.bias is None else adapter.bias[columns],
            )
            paths[key] = f"{path}/{target}"
    replacements = {}  # block weights as a Linear's [out, in]: GPT-2's Conv1D [in, out] transposed
    for module, parts in getattr(adapters, "replacements", {}).items():
        found = where(module)
        if found is None:
            replacements[module] = parts
            continue
        translated, (path, targets) = True, found
        if targets is None:  # the embedding table, as it is
            replacements[module], paths[module] = parts, path
        elif isinstance(targets, str):
            replacements[module], paths[module] = (
                _weight_layout(parts, not layout.fan_in_fan_out),
                f"{path}/{targets}",
            )
        else:  # GPT-2's c_attn: its Conv1D weight [in, 3 * out], its bias [3 * out]
            for i, target in enumerate(targets):
                key = f"{module}:{target.rsplit('/', 1)[-1]}"
                third = {param: _third(module, array, i, len(targets)) for param, array in parts.items()}
                replacements[key], paths[key] = (
                    _weight_layout(third, not layout.fan_in_fan_out),
                    f"{path}/{target}",
                )
    if not translated:
        return None, None
    config = getattr(adapters, "config", {})
    return AdapterSet(out, replacements, config), lambda key: paths.get(key, key)


def _weight_layout(parts, as_is):
    """Parts with their weight between `[in, out]` and a Linear's `[out, in]` (adapter.linear_layout)."""
    return {**parts, "weight": linear_layout(parts["weight"], as_is)} if "weight" in parts else parts


def _third(module, array, i, count):
    """Part `i` of `count` of a fused weight's output axis (the last: Conv1D's `[in, out]`, a bias)."""
    width, rem = divmod(array.shape[-1], count)
    if rem:
        raise ValueError(
            f"{module}: the fused weight's output ({array.shape[-1]}) does not split into {count}"
        )
    return np.ascontiguousarray(array[..., i * width : (i + 1) * width])


def _reverse(layout):
    """keras-hub layer under a block -> (HF module under the block, its index in a fused module, count)."""
    reverse = {}
    for hf, keras_layers in layout.modules.items():
        for i, layer in enumerate((keras_layers,) if isinstance(keras_layers, str) else keras_layers):
            reverse[layer] = (hf, i, 1 if isinstance(keras_layers, str) else len(keras_layers))
    return reverse


def replacements_to_hf(model, whole):
    """`{layer path: {"weight": [in, out], "bias": [out]}}` (whole layers of a keras-hub model of a known
    architecture, from_model's `modules_to_save`) -> `{HF module name: parts}` in the transformers model's
    layout (AdapterSet.replacements): a Linear's weight `[out, in]`, GPT-2's Conv1D `[in, out]`, the token
    embedding as it is. GPT-2's query, key and value make one c_attn: a part not given is the model's own.

    Raises:
      ValueError: a layer without a Hugging Face name (PEFT would not load it: it would silently keep its
        own weights).
    """
    layout, prefix = find_backbone(model)
    block = re.compile(re.escape(prefix) + layout.keras_block.replace("{}", r"(\d+)") + "/(.+)")
    reverse, layers = _reverse(layout), layers_by_path(model)
    out, fused = {}, {}
    for path, parts in whole.items():
        if path == prefix + layout.embedding[1]:
            out[layout.embedding[0]] = parts
            continue
        match = block.fullmatch(path)
        if match is None or match[2] not in reverse:
            raise ValueError(
                f"from_model: modules_to_save {path!r} has no Hugging Face module name in a "
                f"{layout.backbones[0]} (its layers with one: {layout.embedding[1]} and, in each block, "
                f"{sorted(reverse)}); pass mapping='paths' to export Keras names"
            )
        hf, index, count = reverse[match[2]]
        module = f"{layout.hf_export.format(match[1])}.{hf}"
        if count > 1:
            fused.setdefault((module, match[1], hf), {})[index] = parts
            continue
        out[module] = _weight_layout(parts, layout.fan_in_fan_out)
    for (module, number, hf), given in fused.items():
        block_path = prefix + layout.keras_block.format(number)
        group = [
            given.get(i) or layer_parts(layers[f"{block_path}/{target}"])
            for i, target in enumerate(layout.modules[hf])
        ]
        parts = {"weight": np.concatenate([p["weight"] for p in group], axis=1)}
        if all("bias" in p for p in group):
            parts["bias"] = np.concatenate([p["bias"] for p in group])
        out[module] = _weight_layout(parts, layout.fan_in_fan_out)
    return out


def to_hf(model, adapters):
    """`{layer path: Adapter}` (from a keras-hub model) -> `{HF module name: Adapter}` for a known
    architecture, as the CausalLM model names them (`model.layers.0.self_attn.q_proj`,
    `transformer.h.0.attn.c_attn`); None when `model` holds no known backbone or a path has no HF name.
    GPT-2's query, key and value adapters fuse into one c_attn adapter: the same adapter when they share
    `a` and the scale, else one of their summed rank (alpha = that rank, each scale folded into its part of
    `b`), exact either way; a missing part is zero."""
    layout, prefix = find_backbone(model)
    if layout is None:
        return None
    block = re.compile(re.escape(prefix) + layout.keras_block.replace("{}", r"(\d+)") + "/(.+)")
    reverse = _reverse(layout)
    parts, out, members = {}, {}, {}
    for path, adapter in adapters.items():
        if path == prefix + layout.embedding[1]:
            out[layout.embedding[0]] = dataclasses.replace(adapter, module=layout.embedding[0])
            continue
        match = block.fullmatch(path)
        if match is None or match[2] not in reverse:
            return None
        hf, index, count = reverse[match[2]]
        module = f"{layout.hf_export.format(match[1])}.{hf}"
        metadata = {**adapter.metadata, "fan_in_fan_out": layout.fan_in_fan_out}
        if count == 1:
            out[module] = dataclasses.replace(adapter, module=module, metadata=metadata)
        else:
            parts.setdefault(module, [None] * count)[index] = dataclasses.replace(adapter, metadata=metadata)
            block_path = path[: -len(match[2])]
            members[module] = [block_path + layer for layer in layout.modules[hf]]
    layers = layers_by_path(model)
    for module, group in parts.items():
        out[module] = _fuse(module, group, [layers.get(path) for path in members[module]])
    return out


def _fuse(module, group, layers):
    """One c_attn adapter from the query, key and value adapters `group` (None: a layer without one) of the
    keras-hub `layers` they are on; a part without a bias in the group takes its layer's own."""
    present = [p for p in group if p is not None]
    first = present[0]
    widths = {p.b.shape[1] for p in present}
    width = widths.pop()
    same = len(present) == len(group) and all(
        np.array_equal(p.a, first.a) and p.scale == first.scale for p in present
    )
    if same:
        extra = {
            field: np.concatenate([getattr(p, field) for p in group])
            for field in ("magnitude", "bias")
            if all(getattr(p, field) is not None for p in group)
        }
        b = np.concatenate([p.b for p in group], axis=1)
        return dataclasses.replace(first, b=b, module=module, **{"magnitude": None, "bias": None, **extra})
    if any(p.use_dora for p in present):
        raise ValueError(
            f"{module}: the query, key and value adapters fuse into one only when they share a and the "
            "scale, or are plain LoRA: DoRA's column norms of a partial fuse have no exact PEFT form"
        )
    bias = None
    if any(p.bias is not None for p in present):  # c_attn's bias is theirs side by side, whatever a is
        own = [
            np.reshape(layer.bias.numpy(), [-1]) if getattr(layer, "bias", None) is not None else None
            for layer in layers
        ]
        pieces = [p.bias if p is not None and p.bias is not None else own[i] for i, p in enumerate(group)]
        if any(piece is None for piece in pieces):
            raise ValueError(f"{module}: some of query, key and value have a bias, some none: c_attn has one")
        bias = np.concatenate(pieces)
    rank = sum(p.rank for p in present)
    a = np.concatenate([p.a for p in present], axis=1).astype(np.float32)
    b = np.zeros((rank, width * len(group)), np.float32)
    row = 0
    for i, p in enumerate(group):
        if p is None:
            continue
        b[row : row + p.rank, i * width : (i + 1) * width] = p.b * p.scale
        row += p.rank
    return Adapter(
        a, b, alpha=float(rank), use_rslora=False, module=module, metadata=first.metadata, bias=bias
    )
