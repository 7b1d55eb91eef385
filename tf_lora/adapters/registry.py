"""tf_lora.adapters.Registry: versioned adapters on disk, hot-swapped into a model's weights."""

import datetime
import json
import os
import tempfile

import numpy as np

from tf_lora.adapters.kohya import load_kohya
from tf_lora.adapters.model_apply import apply
from tf_lora.adapters.peft import WEIGHTS, load_peft
from tf_lora.adapters.safetensors_io import sha256_file
from tf_lora.layers.kernel_layout import kernel_variable
from tf_lora.layers.model_layers import layers_by_path

MANIFEST = "manifest.json"
_LOADERS = {"peft": (load_peft, WEIGHTS), "kohya": (load_kohya, None)}


class Registry:
    """A manifest of adapters (name, version, path, format, sha256, created) in `directory`, and the one
    adapter active in `model`, merged into its Dense and EinsumDense kernels (at any depth) for serving with
    no LoRA ops.

    Activating restores the kernels the registry has touched to their values before its first
    activation, then merges the chosen adapter in place (tf_lora.merge_into_variable: no new kernel is
    allocated), so any activation, and `rollback()` to the previous one, gives exact weights, not merges
    and unmerges accumulating rounding. A failed activation (checksum, shapes, mapping) changes neither the
    model nor the manifest. `model` must hold the base weights when the Registry is made: the base
    snapshot lives in memory, and a reopened Registry re-activates from the manifest on demand.

    >>> registry = tf_lora.adapters.Registry(directory, model)  # doctest: +SKIP
    >>> registry.register("support-bot", "adapters/support-v3/")  # doctest: +SKIP
    >>> registry.activate("support-bot")  # latest version  # doctest: +SKIP
    >>> registry.rollback()  # doctest: +SKIP
    """

    def __init__(self, directory, model, mapping=None):
        self.directory = os.fspath(directory)
        self.model = model
        self.mapping = mapping
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, MANIFEST)
        if os.path.exists(path):
            with open(path) as f:
                self._manifest = json.load(f)
        else:
            self._manifest = {"adapters": [], "active": None, "history": []}
        self._base = {}  # layer path -> [kernel, bias] values before this registry's first activation

    @property
    def entries(self) -> list:
        return [dict(e) for e in self._manifest["adapters"]]

    @property
    def active(self):
        """(name, version) of the active adapter, or None."""
        active = self._manifest["active"]
        return None if active is None else (active["name"], active["version"])

    def register(self, name, path, version=None, format="peft") -> int:  # noqa: A002 - the format's name
        """Adds an adapter (a PEFT directory or a kohya file) under `name`; returns its version."""
        if format not in _LOADERS:
            raise ValueError(f"Registry.register: format must be one of {sorted(_LOADERS)}, got {format!r}")
        path = os.path.abspath(os.fspath(path))
        _LOADERS[format][0](path)  # a file that does not load is not registered
        versions = [e["version"] for e in self._manifest["adapters"] if e["name"] == name]
        version = (max(versions, default=0) + 1) if version is None else int(version)
        if version in versions:
            raise ValueError(f"Registry.register: {name} version {version} exists")
        self._manifest["adapters"].append(
            {
                "name": name,
                "version": version,
                "path": path,
                "format": format,
                "sha256": sha256_file(self._weights_file(path, format)),
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            }
        )
        self._save()
        return version

    def activate(self, name, version=None):
        """Makes adapter `name` (latest version by default) the one merged into the model."""
        entry = self._entry(name, version)
        self._switch(entry)
        self._manifest["history"].append({"name": entry["name"], "version": entry["version"]})
        self._manifest["active"] = self._manifest["history"][-1]
        self._save()

    def rollback(self):
        """Re-activates the previously active adapter (or none), exactly."""
        history = self._manifest["history"]
        if not history:
            raise ValueError("Registry.rollback: nothing was activated")
        previous = history[-2] if len(history) > 1 else None
        self._switch(None if previous is None else self._entry(previous["name"], previous["version"]))
        history.pop()
        self._manifest["active"] = previous
        self._save()

    def deactivate(self):
        """Restores the model's kernels as they were before the first activation."""
        self._switch(None)
        self._manifest["history"].append(None)
        self._manifest["active"] = None
        self._save()

    def _switch(self, entry):
        adapters = {}
        if entry is not None:
            loader, _ = _LOADERS[entry["format"]]
            adapters = loader(entry["path"], sha256=entry["sha256"])
            report = apply(self.model, adapters, mode="merge", mapping=self.mapping, dry_run=True)
            layers = set(report.applied.values()) | set(report.replaced.values())
        else:
            layers = set()
        by_path = layers_by_path(self.model)
        for path in layers - set(self._base):  # the weight, and the bias a file may also replace
            layer = by_path[path]
            variables = [kernel_variable(layer)] + (
                [layer.bias] if getattr(layer, "bias", None) is not None else []
            )
            self._base[path] = [np.array(v.numpy()) for v in variables]
        for path, values in self._base.items():  # back to the base, in place
            layer = by_path[path]
            variables = [kernel_variable(layer)] + (
                [layer.bias] if getattr(layer, "bias", None) is not None else []
            )
            for variable, value in zip(variables, values, strict=True):
                variable.assign(value)
        if adapters:
            apply(self.model, adapters, mode="merge", mapping=self.mapping)

    def _entry(self, name, version):
        entries = [e for e in self._manifest["adapters"] if e["name"] == name]
        if not entries:
            raise ValueError(f"Registry: no adapter named {name!r}")
        if version is None:
            return max(entries, key=lambda e: e["version"])
        for e in entries:
            if e["version"] == int(version):
                return e
        raise ValueError(
            f"Registry: {name} has no version {version} (has {sorted(e['version'] for e in entries)})"
        )

    @staticmethod
    def _weights_file(path, format):  # noqa: A002
        weights = _LOADERS[format][1]
        return os.path.join(path, weights) if weights else path

    def _save(self):
        fd, tmp = tempfile.mkstemp(prefix=".manifest_", dir=self.directory)
        with os.fdopen(fd, "w") as f:
            json.dump(self._manifest, f, indent=2)
        os.replace(tmp, os.path.join(self.directory, MANIFEST))
