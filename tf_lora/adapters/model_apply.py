"""tf_lora.adapters.apply (defined here): file adapters onto the layers of a Keras model, all or nothing."""

import dataclasses

import numpy as np

from tf_lora.adapters import hf_names
from tf_lora.adapters.adapter import Adapter, AdapterSet, linear_layout
from tf_lora.adapters.module_names import module_mapper, resolve_layer
from tf_lora.layers.conversion import bias_problem, check_convertible, forget_traces, set_bias, to_lora
from tf_lora.layers.kernel_layout import layer_parts, lora_shape, merge_into_layer, set_kernel_matrix
from tf_lora.layers.lora_embedding import warn_if_tied
from tf_lora.layers.lora_layer import ADAPTER_NAME, DEFAULT_ADAPTER, LoraAdapters
from tf_lora.layers.lora_model import mark
from tf_lora.layers.model_layers import describe_paths, layers_by_path, lora_kind


@dataclasses.dataclass
class ApplyReport:
    """What `apply` did: file modules -> layers, file modules that matched no layer, and the model's
    LoRA-able layers (LoRA layers for attach, Dense and EinsumDense for merge) without an adapter, by path."""

    applied: dict
    unmatched_modules: list
    layers_without_adapter: list
    replaced: dict = dataclasses.field(default_factory=dict)


def apply(
    model, adapters: dict, mode="attach", mapping=None, strict=True, dry_run=False, adapter_name="default"
) -> ApplyReport:
    """Puts `{module name: Adapter}` (from load_peft / load_kohya) onto the layers of a Keras model.

    Every pair is checked (layer kind, rank, shapes) before any variable changes: on any mismatch the model
    is left exactly as it was and the error lists every mismatch.

    Args:
      model: A Keras model; its layers are found at any depth, by path
        (`transformer_layer_0/self_attention/query`) or by name when the name is unique.
      adapters: `{module name: Adapter}`.
      mode: 'attach' puts the adapters on the layers as LoRA adapters: a LoRA layer (LoraDense,
        LoraEinsumDense) gets them in its named adapter, a plain Dense or EinsumDense becomes one in place
        (its weights kept and frozen) sized from the file; 'merge' folds them into the weights of Dense and
        EinsumDense layers (LoRA or not) in place, for serving without LoRA ops. An EinsumDense weight is
        seen as [in, out] through its equation (tf_lora.layers.EinsumView).
      mapping: How file module names become layer paths or names: None (the same names; on a keras-hub
        model of an architecture tf_lora.adapters.hf_names knows, Hugging Face module names such as
        `model.layers.0.self_attn.q_proj` or GPT-2's fused `transformer.h.0.attn.c_attn` map to its
        layers by themselves), a function
        (module -> layer path or None), or a list of (regex, replacement) pairs, the first full match wins
        (e.g. `[(r"model\\.layers\\.(\\d+)\\.self_attn\\.q_proj", r"block_\\1/q")]`).
      strict: A module that maps to no layer is an error (else it is reported).
      dry_run: Check everything, change nothing.
      adapter_name: For attach, the LoRA layer's adapter that receives the weights; a layer without one of
        that name gets it added with the file's rank (so several files can be served side by side through
        per-example adapter ids); an existing one must have the file's rank.

    Returns:
      An ApplyReport.
    """
    if mode not in ("attach", "merge"):
        raise ValueError(f"apply: mode must be 'attach' or 'merge', got {mode!r}")
    if mode == "attach" and not ADAPTER_NAME.fullmatch(str(adapter_name)):
        raise ValueError(f"apply: adapter_name must be letters, digits or _, got {adapter_name!r}")
    layers = layers_by_path(model)
    # A whole weight a file replaces is in the file's layout; `fan_in_fan_out` says a Conv1D's [in, out]
    # (hf_names gives a known architecture's block weights as a Linear's, whatever the file's flag).
    fan_in_fan_out = bool(getattr(adapters, "config", {}).get("fan_in_fan_out"))
    if mapping is None:  # Hugging Face names on a keras-hub model of a known architecture
        translated, hf_mapping = hf_names.to_keras_hub(model, adapters)
        if translated is not None:
            adapters, mapping, fan_in_fan_out = translated, hf_mapping, False
    to_layer = module_mapper(mapping)
    pairs, unmatched, problems = [], [], []
    for module, adapter in sorted(adapters.items()):
        path = resolve_layer(layers, to_layer(module))
        if path is None:
            unmatched.append(module)
            continue
        layer = layers[path]
        problem = check_convertible(layer, f"{module} -> {path}")
        if problem:
            problems.append(problem)
            continue
        expected = lora_shape(layer)
        if (adapter.a.shape[0], adapter.b.shape[1]) != expected:
            problems.append(
                f"{module} -> {path}: adapter is [{adapter.a.shape[0]}, {adapter.b.shape[1]}], "
                f"the layer's weight as [in, out] is [{expected[0]}, {expected[1]}]"
            )
            continue
        lora = isinstance(layer, LoraAdapters)
        slot = layer._slots.get(adapter_name) if mode == "attach" and lora else None  # noqa: SLF001
        if slot is not None and adapter.use_dora != slot.use_dora:
            problems.append(
                f"{module} -> {path}: a {'DoRA' if adapter.use_dora else 'plain LoRA'} adapter, layer "
                f"adapter {adapter_name!r} is {'DoRA' if slot.use_dora else 'plain LoRA'}"
            )
            continue
        if adapter.bias is not None and bias_problem(layer, adapter.bias):
            problems.append(
                f"{module} -> {path}: the file trains its bias, but {bias_problem(layer, adapter.bias)}"
            )
            continue
        if slot is not None and adapter.rank != slot.rank:
            problems.append(
                f"{module} -> {path}: adapter rank {adapter.rank}, "
                f"layer adapter {adapter_name!r} rank {slot.rank}"
            )
            continue
        if slot is not None and layer.merged and layer.active_adapter == adapter_name:
            problems.append(f"{module} -> {path}: adapter {adapter_name!r} is merged (unmerge() it first)")
            continue
        if not all(
            np.all(np.isfinite(w)) for w in (adapter.a, adapter.b, adapter.magnitude) if w is not None
        ):
            problems.append(f"{module} -> {path}: NaN or Inf weights")
            continue
        pairs.append((module, path, layer, adapter))
    replacements = getattr(adapters, "replacements", {})
    replaced = _check_replacements(replacements, layers, to_layer, fan_in_fan_out, unmatched, problems)
    if strict and unmatched:
        whole = [m for m in unmatched if m in replacements]
        problems.append(
            f"modules that match no layer: {unmatched} (pass a mapping"
            + (
                f"; {whole} are whole weights or biases the file replaces: leaving them out (strict=False) "
                "changes the outputs"
                if whole
                else ", or strict=False"
            )
            + "; the model's Dense and EinsumDense layers by path: "
            f"{describe_paths(p for p, x in layers.items() if lora_kind(x))})"
        )
    if problems:
        raise ValueError("apply: nothing changed; " + "; ".join(problems))
    # Whole weights first (a saved base table is what the adapters then merge into).
    for _, _, layer, parts in [] if dry_run else replaced:
        if "weight" in parts:
            set_kernel_matrix(layer, parts["weight"])
        if "bias" in parts:
            set_bias(layer, parts["bias"])
    for module, path, layer, adapter in [] if dry_run else pairs:
        if adapter.bias is not None:
            set_bias(layer, adapter.bias)
        if mode == "merge":
            warn_if_tied(layer, f"apply: {module} -> {path}", stacklevel=2)
            merge_into_layer(layer, adapter.a, adapter.b, adapter.scale, adapter.magnitude)
            continue
        if not isinstance(layer, LoraAdapters):
            for variable in layer.weights:
                variable.trainable = False
            to_lora(layer, adapter.rank, adapter.alpha, adapter.use_rslora, use_dora=adapter.use_dora)
            if adapter_name != "default":
                layer.set_active_adapter(None)
        dtype = layer.adapter_slot().a.dtype
        if adapter_name not in layer.adapter_names:
            layer.add_adapter(adapter_name, rank=adapter.rank, use_dora=adapter.use_dora)
        layer.set_adapter(
            adapter.a.astype(dtype),
            adapter.b.astype(dtype),
            adapter.alpha,
            adapter.use_rslora,
            adapter_name,
            magnitude=adapter.magnitude,
        )
    if mode == "attach" and not dry_run:
        # As PEFT's from_pretrained and inject_lora: the base is frozen; the LoRA layers' active adapters
        # train, and so do the layers the file replaces whole (modules_to_save).
        for variable in model.weights:
            variable.trainable = False
        for layer in layers.values():
            if isinstance(layer, LoraAdapters):
                layer._set_trainable()  # noqa: SLF001
                if getattr(layer, "bias", None) is not None:
                    layer.bias.trainable = layer.train_bias
        for _, _, layer, parts in replaced:
            if "weight" in parts:
                for variable in layer.weights:
                    variable.trainable = True
        forget_traces(model)
        mark(model)
    kinds = ("dense", "einsum")  # an embedding table is reported only when it got an adapter
    targets = [
        p
        for p, x in layers.items()
        if (isinstance(x, LoraAdapters) if mode == "attach" else lora_kind(x) in kinds)
    ]
    applied = {module: path for module, path, _, _ in pairs}
    replaced_paths = {module: path for module, path, _, _ in replaced}
    return ApplyReport(applied, unmatched, sorted(set(targets) - set(applied.values())), replaced_paths)


def _placeholder_default(layer):
    """Whether a LoRA layer's default adapter only holds its place: every LoRA layer has one, so a layer
    that became a LoRA layer for another named adapter (apply(..., adapter_name=...)) got one at zero that
    nothing set or trained: B all zero, another adapter beside it, not the active one."""
    return (
        len(layer.adapter_names) > 1
        and layer.active_adapter != DEFAULT_ADAPTER
        and not np.any(layer.adapter_slot(DEFAULT_ADAPTER).b.numpy())
    )


def _check_replacements(replacements, layers, to_layer, fan_in_fan_out, unmatched, problems):
    """[(module, path, layer, parts)] for the weights a file replaces whole (modules_to_save, other
    biases), each checked against its layer, its weight turned from the file's layout into the layer's
    `[in, out]` (AdapterSet.replacements); problems and unmatched modules are appended to."""
    found = []
    for module, parts in sorted(replacements.items()):
        path = resolve_layer(layers, to_layer(module))
        if path is None:
            unmatched.append(module)
            continue
        layer = layers[path]
        if "weight" in parts:
            if lora_kind(layer) is None:
                problems.append(
                    f"{module} -> {path}: replaces a weight, but a {type(layer).__name__} has none"
                )
                continue
            weight = np.asarray(parts["weight"])
            as_is = lora_kind(layer) == "embedding" or fan_in_fan_out  # a table, or a Conv1D's [in, out]
            parts = {**parts, "weight": linear_layout(weight, as_is)}
            expected = lora_shape(layer)
            if tuple(np.shape(parts["weight"])) != expected:
                problems.append(
                    f"{module} -> {path}: a saved weight [{', '.join(map(str, np.shape(weight)))}] "
                    f"({'as the layer holds it' if as_is else 'a Linear [out, in]'}), the layer's as "
                    f"[in, out] is [{expected[0]}, {expected[1]}]"
                )
                continue
        if "bias" in parts and bias_problem(layer, parts["bias"]):
            problems.append(f"{module} -> {path}: a saved bias, but {bias_problem(layer, parts['bias'])}")
            continue
        found.append((module, path, layer, parts))
    return found


def from_model(model, adapter_name="default", mapping=None, bias="none", modules_to_save=()) -> AdapterSet:
    """The adapters of a model's LoRA layers as `{module name: Adapter}` (an AdapterSet), ready for
    `save_peft` or `save_kohya`: the inverse of `apply(..., mode='attach')`.

    Args:
      model: A Keras model (layers found recursively).
      adapter_name: Which named adapter of each LoRA layer; layers without it are skipped, and so are layers
        whose default adapter only holds its place (a layer that became a LoRA layer for another named
        adapter gets a default at zero: B all zero, not active), as PEFT's layers without that adapter.
      mapping: How layer paths become module names: None (the Hugging Face names for a keras-hub model of
        an architecture tf_lora.adapters.hf_names knows, so that the PEFT files load onto the transformers
        model; else the paths), "paths" (the paths), or a function (layer path -> module name).
      bias: "none", or "lora_only": each adapted layer's bias goes with its adapter (PEFT's
        `bias="lora_only"`, for layers trained with `train_bias`).
      modules_to_save: Paths or names of layers saved whole beside the adapters (PEFT's
        `modules_to_save`, e.g. a new classifier head), weight `[in, out]` and bias.

    Returns:
      An AdapterSet `{module name: Adapter}` with numpy weights in TF layout (DoRA adapters with their
      magnitudes); an error if no layer has the adapter.
    """
    if bias not in ("none", "lora_only"):
        raise ValueError(f"from_model: bias must be 'none' or 'lora_only', got {bias!r}")
    to_module = mapping if callable(mapping) else (lambda path: path)
    layers = layers_by_path(model)
    adapters = {}
    for path, layer in layers.items():
        if not isinstance(layer, LoraAdapters) or adapter_name not in layer.adapter_names:
            continue
        if adapter_name == DEFAULT_ADAPTER and _placeholder_default(layer):
            continue
        slot = layer.adapter_slot(adapter_name)
        module = to_module(path)
        if module in adapters:
            raise ValueError(
                f"from_model: layers {adapters[module].metadata['layer']} and {path} both map "
                f"to module {module!r}"
            )
        layer_bias = getattr(layer, "bias", None) if bias == "lora_only" else None
        adapters[module] = Adapter(
            slot.a.numpy(),
            slot.b.numpy(),
            alpha=slot.alpha,
            use_rslora=slot.use_rslora,
            module=module,
            metadata={
                "format": "keras",
                "layer": path,
                "adapter_name": adapter_name,
                "embedding": lora_kind(layer) == "embedding",
            },
            magnitude=slot.magnitude.numpy() if slot.use_dora else None,
            bias=None if layer_bias is None else np.reshape(layer_bias.numpy(), [-1]),
        )
    if not adapters:
        raise ValueError(f"from_model: no LoRA layer of the model has an adapter {adapter_name!r}")
    whole = {}  # path -> {"weight": [in, out], "bias": [out]}
    for key in modules_to_save:
        path = resolve_layer(layers, key)
        if path is None or lora_kind(layers[path]) is None:
            raise ValueError(
                f"from_model: modules_to_save {key!r} is not a Dense, EinsumDense or Embedding layer of the "
                "model"
            )
        whole[path] = layer_parts(layers[path])
    if mapping is None:
        hf = hf_names.to_hf(model, adapters)
        if hf is not None:  # Hugging Face names, the whole layers' too (in the transformers model's layout)
            return AdapterSet(hf, hf_names.replacements_to_hf(model, whole))
    replacements = {}
    for path, parts in whole.items():
        table = lora_kind(layers[path]) == "embedding"  # [vocab, dim] in both layouts
        replacements[to_module(path)] = {**parts, "weight": linear_layout(parts["weight"], table)}
    return AdapterSet(adapters, replacements)
