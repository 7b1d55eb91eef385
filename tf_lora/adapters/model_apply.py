"""tf_lora.adapters.apply (defined here): file adapters onto the layers of a Keras model, all or nothing."""

import dataclasses

import numpy as np

from tf_lora.adapters.adapter import Adapter
from tf_lora.adapters.model_layers import all_layers, module_mapper
from tf_lora.layers.lora_dense import ADAPTER_NAME, LoraDense
from tf_lora.python.ops import lora_ops


@dataclasses.dataclass
class ApplyReport:
    """What `apply` did: file modules -> layers, file modules that matched no layer, and the model's
    LoRA-able layers (LoraDense for attach, Dense for merge) that got no adapter."""

    applied: dict
    unmatched_modules: list
    layers_without_adapter: list


def apply(
    model, adapters: dict, mode="attach", mapping=None, strict=True, dry_run=False, adapter_name="default"
) -> ApplyReport:
    """Puts `{module name: Adapter}` (from load_peft / load_kohya) onto the layers of a Keras model.

    Every pair is checked (layer kind, rank, shapes) before any variable changes: on any mismatch the model
    is left exactly as it was and the error lists every mismatch.

    Args:
      model: A Keras model (layers found recursively).
      adapters: `{module name: Adapter}`.
      mode: 'attach' sets the adapters of LoraDense layers (same rank); 'merge' folds them into the kernels
        of Dense (or LoraDense) layers in place, for serving without LoRA ops.
      mapping: How file module names become layer names: None (the same names), a function (module ->
        layer name or None), or a list of (regex, replacement) pairs, the first full match wins
        (e.g. `[(r"model\\.layers\\.(\\d+)\\.self_attn\\.q_proj", r"block_\\1_q")]`).
      strict: A module that maps to no layer is an error (else it is reported).
      dry_run: Check everything, change nothing.
      adapter_name: For attach, the LoraDense adapter that receives the weights; a layer without one of that
        name gets it added with the file's rank (so several files can be served side by side through
        per-example adapter ids); an existing one must have the file's rank.

    Returns:
      An ApplyReport.
    """
    if mode not in ("attach", "merge"):
        raise ValueError(f"apply: mode must be 'attach' or 'merge', got {mode!r}")
    if mode == "attach" and not ADAPTER_NAME.fullmatch(str(adapter_name)):
        raise ValueError(f"apply: adapter_name must be letters, digits or _, got {adapter_name!r}")
    layers = {layer.name: layer for layer in all_layers(model)}
    to_layer = module_mapper(mapping)
    pairs, unmatched, problems = [], [], []
    for module, adapter in sorted(adapters.items()):
        name = to_layer(module)
        if name is None or name not in layers:
            unmatched.append(module)
            continue
        layer = layers[name]
        kernel = getattr(layer, "kernel", None)
        if kernel is None or len(kernel.shape) != 2:
            problems.append(f"{module} -> {name}: not a Dense-like layer ({type(layer).__name__})")
            continue
        if mode == "attach" and not isinstance(layer, LoraDense):
            problems.append(f"{module} -> {name}: attach needs a LoraDense layer, got {type(layer).__name__}")
            continue
        expected = (kernel.shape[0], kernel.shape[1])
        if (adapter.a.shape[0], adapter.b.shape[1]) != expected:
            problems.append(
                f"{module} -> {name}: adapter is [{adapter.a.shape[0]}, {adapter.b.shape[1]}], "
                f"the kernel [{expected[0]}, {expected[1]}]"
            )
            continue
        slot = layer._slots.get(adapter_name) if mode == "attach" else None
        if slot is not None and adapter.rank != slot.rank:
            problems.append(
                f"{module} -> {name}: adapter rank {adapter.rank}, "
                f"layer adapter {adapter_name!r} rank {slot.rank}"
            )
            continue
        if slot is not None and layer.merged and layer.active_adapter == adapter_name:
            problems.append(f"{module} -> {name}: adapter {adapter_name!r} is merged (unmerge() it first)")
            continue
        if not (np.all(np.isfinite(adapter.a)) and np.all(np.isfinite(adapter.b))):
            problems.append(f"{module} -> {name}: NaN or Inf weights")
            continue
        pairs.append((module, layer, adapter))
    if strict and unmatched:
        problems.append(f"modules that match no layer: {unmatched} (pass a mapping, or strict=False)")
    if problems:
        raise ValueError("apply: nothing changed; " + "; ".join(problems))
    for _, layer, adapter in [] if dry_run else pairs:
        dtype = layer.kernel.dtype
        a, b = adapter.a.astype(dtype), adapter.b.astype(dtype)
        if mode == "attach":
            if adapter_name not in layer.adapter_names:
                layer.add_adapter(adapter_name, rank=adapter.rank)
            layer.set_adapter(a, b, adapter.alpha, adapter.use_rslora, adapter_name=adapter_name)
        else:
            lora_ops.merge_into_variable(layer.kernel, a, b, adapter.scale)
    kind = LoraDense if mode == "attach" else type(None)
    targets = [
        n
        for n, layer in layers.items()
        if (isinstance(layer, kind) if mode == "attach" else getattr(layer, "kernel", None) is not None)
    ]
    applied = {module: layer.name for module, layer, _ in pairs}
    return ApplyReport(applied, unmatched, sorted(set(targets) - set(applied.values())))


def from_model(model, adapter_name="default", mapping=None) -> dict:
    """The adapters of a model's LoraDense layers as `{module name: Adapter}`, ready for `save_peft` or
    `save_kohya`: the inverse of `apply(..., mode='attach')`.

    Args:
      model: A Keras model (layers found recursively).
      adapter_name: Which named adapter of each LoraDense; layers without it are skipped.
      mapping: How layer names become module names: None (the same), or a function (layer name ->
        module name).

    Returns:
      `{module name: Adapter}` with float32 numpy weights in TF layout; an error if no layer has the adapter.
    """
    to_module = mapping or (lambda name: name)
    adapters = {}
    for layer in all_layers(model):
        if not isinstance(layer, LoraDense) or adapter_name not in layer.adapter_names:
            continue
        slot = layer._slots[adapter_name]
        module = to_module(layer.name)
        if module in adapters:
            raise ValueError(
                f"from_model: layers {adapters[module].metadata['layer']} and {layer.name} both map "
                f"to module {module!r}"
            )
        adapters[module] = Adapter(
            slot.a.numpy(),
            slot.b.numpy(),
            alpha=slot.alpha,
            use_rslora=slot.use_rslora,
            module=module,
            metadata={"format": "keras", "layer": layer.name, "adapter_name": adapter_name},
        )
    if not adapters:
        raise ValueError(f"from_model: no LoraDense layer of the model has an adapter {adapter_name!r}")
    return adapters
