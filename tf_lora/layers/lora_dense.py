"""tf_lora.layers.LoraDense: keras.layers.Dense with LoRA adapters on a frozen kernel."""

import dataclasses
import math
import re

import keras
import tensorflow as tf

from tf_lora.python.ops import lora_ops

DEFAULT_ADAPTER = "default"
# What an adapter name may be (it becomes part of variable names).
ADAPTER_NAME = re.compile(r"\w+")


@dataclasses.dataclass
class _Slot:
    """One named adapter of a LoraDense: its hyper-parameters and (once built) its variables."""

    name: str
    rank: int
    alpha: float
    use_rslora: bool
    a: keras.Variable = None
    b: keras.Variable = None
    scale_var: keras.Variable = None

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def spec(self) -> dict:
        return {"name": self.name, "rank": self.rank, "alpha": self.alpha, "use_rslora": self.use_rslora}


def _keras_lora_names(rank, alpha, lora_rank, lora_alpha):
    """(rank, alpha) from tf_lora's names or Keras Dense's (`lora_rank`, `lora_alpha`, whose alpha defaults
    to the rank, as in Keras). Each may be given once; tf_lora's defaults are rank 8, alpha 16."""
    if lora_rank is not None:
        if rank is not None and int(rank) != int(lora_rank):
            raise ValueError(f"LoraDense: rank={rank} and Keras's lora_rank={lora_rank} disagree; give one")
        rank = lora_rank
    if lora_alpha is not None:
        if alpha is not None and float(alpha) != float(lora_alpha):
            raise ValueError(
                f"LoraDense: alpha={alpha} and Keras's lora_alpha={lora_alpha} disagree; give one"
            )
        alpha = lora_alpha
    if alpha is None:
        alpha = rank if lora_rank is not None else 16.0
    return (8 if rank is None else rank), alpha


@keras.saving.register_keras_serializable(package="tf_lora")
class LoraDense(keras.layers.Dense):
    """A drop-in `keras.layers.Dense` (same arguments) whose kernel is frozen and adapted by LoRA:
    `activation(x @ kernel + bias + scale * dropout(x) @ lora_a @ lora_b)`.

    `lora_a` `[in, rank]` starts He-uniform and `lora_b` `[rank, units]` at zero, so the layer starts as the
    Dense it replaces. The forward runs through `tf_lora.lora_matmul` (TensorFlow's MatMul, then the fused
    LoRA apply on its output). `merge()` folds the active adapter into the kernel in place and `unmerge()`
    takes it out again (for serving, or switching adapters without reallocating the kernel).

    Named adapters, as in PEFT: the constructor's adapter is called `"default"`; `add_adapter(name, ...)`
    adds more (each with its own rank and alpha), `set_active_adapter(name)` picks the one applied (and the
    only one trained), and `layer(x, adapter_ids=ids)` gives each example its own adapter, served in one
    pass by `tf_lora.batched_lora_matmul` (`ids[i]` indexes `adapter_names`, -1 means the base layer only).
    The active adapter and the scales live in variables, so a switch among the adapters a traced function
    knows reaches it. Adding or deleting an adapter changes the layer's variables: a function traced before
    then fails with an error saying so (never applies a stale adapter) until traced again
    (`model.compile(...)` resets Keras's fit/evaluate/predict functions).

    Args:
      units, activation, use_bias, ...: As `keras.layers.Dense`.
      rank: LoRA rank r of the default adapter (default 8). Keras's own name `lora_rank` is accepted too.
      alpha: LoRA alpha; the scale is alpha / r, or alpha / sqrt(r) with `use_rslora`. Default 16, or the
        rank when Keras's names are used; `lora_alpha` is accepted too.
      use_rslora: rsLoRA scaling.
      lora_dropout: Dropout rate on the LoRA path's input while training.
      adapters: Specs (`name`, `rank`, `alpha`, `use_rslora`) of the adapters beside the default one; what
        `add_adapter` records, so that `get_config` rebuilds them.
      active_adapter: The adapter active once built (None: none).
      train_bias: Train the bias beside the adapters. Default False: the bias is frozen with the kernel, as
        PEFT's `bias="none"`; the trainable set is the same after a `.keras` round trip.

    >>> layer = tf_lora.layers.LoraDense(3, rank=2, alpha=4)
    >>> layer(tf.ones([1, 5])).shape
    TensorShape([1, 3])
    >>> layer.add_adapter("sql", rank=4, alpha=8)
    >>> layer(tf.ones([2, 5]), adapter_ids=[0, 1]).shape
    TensorShape([2, 3])
    """

    def __init__(
        self,
        units,
        rank=None,
        alpha=None,
        use_rslora=False,
        lora_dropout=0.0,
        adapters=(),
        active_adapter=DEFAULT_ADAPTER,
        train_bias=False,
        lora_rank=None,
        lora_alpha=None,
        **kwargs,
    ):
        rank, alpha = _keras_lora_names(rank, alpha, lora_rank, lora_alpha)
        super().__init__(units, **kwargs)
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"LoraDense: lora_dropout must be in [0, 1), got {lora_dropout}")
        self.lora_dropout = float(lora_dropout)
        self.train_bias = bool(train_bias)
        self._adapters_version = 0
        self._slots = {}
        self._add_slot(DEFAULT_ADAPTER, rank, alpha, use_rslora)
        for spec in adapters:
            self._add_slot(**spec)
        if active_adapter is not None:
            self._slot(active_adapter)
        self._initial_active = active_adapter

    # The default adapter's hyper-parameters, under the names the constructor takes.
    rank = property(lambda self: self._slots[DEFAULT_ADAPTER].rank)
    alpha = property(lambda self: self._slots[DEFAULT_ADAPTER].alpha)
    use_rslora = property(lambda self: self._slots[DEFAULT_ADAPTER].use_rslora)
    scale = property(lambda self: self._slots[DEFAULT_ADAPTER].scale)

    @property
    def adapter_names(self) -> list:
        """The adapters in id order: `adapter_ids` index this list."""
        return list(self._slots)

    def _add_slot(self, name, rank, alpha, use_rslora=False):
        if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
            raise ValueError(f"LoraDense: an adapter name must be letters, digits or _, got {name!r}")
        if name in self._slots:
            raise ValueError(f"LoraDense {self.name}: adapter {name!r} exists already ({self.adapter_names})")
        if int(rank) < 1:
            raise ValueError(f"LoraDense: rank must be >= 1, got {rank} for adapter {name!r}")
        slot = _Slot(name, int(rank), float(alpha), bool(use_rslora))
        self._slots[name] = slot
        if self.built:
            # Keras locks a built layer's state; its own Dense.enable_lora unlocks it the same way.
            self._tracker.unlock()
            try:
                self._build_slot(slot, self.kernel.shape[0], trainable=False)
            finally:
                self._tracker.lock()
            self._adapters_version += 1
            self.lora_adapters_version.assign(self._adapters_version)
        return slot

    def _build_slot(self, slot, in_features, trainable):
        # The default adapter's variables keep the plain names lora_a, lora_b and lora_scale. Each variable is
        # also an attribute of the layer, which is how tf.saved_model finds what traced functions capture.
        suffix = "" if slot.name == DEFAULT_ADAPTER else f"_{slot.name}"
        # Created trainable: the tf.Variable under a Keras variable keeps its creation-time flag, and only a
        # trainable one is watched by gradient tapes; Keras's own flag then says whether it is trained.
        slot.a = self.add_weight(
            name=f"lora_a{suffix}", shape=(in_features, slot.rank), initializer=keras.initializers.HeUniform()
        )
        slot.b = self.add_weight(name=f"lora_b{suffix}", shape=(slot.rank, self.units), initializer="zeros")
        slot.a.trainable = slot.b.trainable = trainable
        # The scale is a variable so that an adapter loaded later with another alpha reaches traced functions.
        slot.scale_var = self.add_weight(
            name=f"lora_scale{suffix}",
            shape=(),
            initializer=keras.initializers.Constant(slot.scale),
            trainable=False,
        )
        for variable in (slot.a, slot.b, slot.scale_var):
            setattr(self, variable.name, variable)

    def build(self, input_shape):
        super().build(input_shape)
        self.kernel.trainable = False
        if self.use_bias:
            self.bias.trainable = self.train_bias
        for slot in self._slots.values():
            self._build_slot(slot, input_shape[-1], trainable=slot.name == self._initial_active)
        # 1 while the adapter is applied beside the kernel, 0 once merged into it: a variable, not a Python
        # flag, so that functions Keras traced before a merge see it too.
        self.lora_active = self.add_weight(name="lora_active", shape=(), initializer="ones", trainable=False)
        # The index of the active adapter in adapter_names, -1 for none.
        self.lora_active_adapter = self.add_weight(
            name="lora_active_adapter",
            shape=(),
            dtype="int32",
            initializer=keras.initializers.Constant(self._index(self._initial_active)),
            trainable=False,
        )
        # Which set of adapters the layer holds, counted up by every add_adapter and delete_adapter after
        # build: a function traced with another set cannot reach the new adapters' variables (and may hold
        # a deleted one's), so it checks this against the version it saw and refuses.
        self.lora_adapters_version = self.add_weight(
            name="lora_adapters_version",
            shape=(),
            dtype="int32",
            initializer=keras.initializers.Constant(self._adapters_version),
            trainable=False,
        )

    @property
    def merged(self) -> bool:
        return float(self.lora_active.numpy()) == 0.0

    @property
    def active_adapter(self):
        """The name of the adapter applied when no `adapter_ids` are given, or None."""
        if not self.built:
            return self._initial_active
        index = int(self.lora_active_adapter.numpy())
        return None if index < 0 else self.adapter_names[index]

    def _index(self, name) -> int:
        return -1 if name is None else self.adapter_names.index(self._slot(name).name)

    def _slot(self, name) -> _Slot:
        if name not in self._slots:
            raise ValueError(f"LoraDense {self.name}: no adapter {name!r} (adapters: {self.adapter_names})")
        return self._slots[name]

    def add_adapter(self, name, rank=None, alpha=None, use_rslora=None):
        """Adds an adapter (B at zero, so it starts as the base layer); rank, alpha and rsLoRA default to the
        default adapter's. It is not active, nor trained, until `set_active_adapter(name)`. A new adapter
        changes the layer's variables: compile the model again before `fit`."""
        default = self._slots[DEFAULT_ADAPTER]
        self._add_slot(
            name,
            default.rank if rank is None else rank,
            default.alpha if alpha is None else alpha,
            default.use_rslora if use_rslora is None else use_rslora,
        )

    def delete_adapter(self, name):
        """Removes adapter `name` and its variables; the default adapter stays, and so does one that is
        merged into the kernel. Ids of the adapters after it shift down by one."""
        slot = self._slot(name)
        if name == DEFAULT_ADAPTER:
            raise ValueError(f"LoraDense {self.name}: the default adapter cannot be deleted")
        active = self.active_adapter
        if active == name and self.merged:
            raise ValueError(
                f"LoraDense {self.name}: adapter {name!r} is merged; unmerge() before deleting it"
            )
        del self._slots[name]
        if active == name:
            self._initial_active = None
        if self.built:
            for variable in (slot.a, slot.b, slot.scale_var):
                self._untrack_variable(variable)
                delattr(self, variable.name)
            self.lora_active_adapter.assign(
                -1 if active in (None, name) else self.adapter_names.index(active)
            )
            self._adapters_version += 1
            self.lora_adapters_version.assign(self._adapters_version)

    def set_active_adapter(self, name):
        """Makes adapter `name` (or None: none) the one applied, merged and trained; the others are frozen.
        Changing what is trainable needs a new `compile` before `fit`, as for any Keras layer."""
        index = self._index(name)
        if not self.built:
            self._initial_active = name
            return
        if self.merged and index != int(self.lora_active_adapter.numpy()):
            raise ValueError(
                f"LoraDense {self.name}: adapter {self.active_adapter!r} is merged; "
                "unmerge() before switching"
            )
        self.lora_active_adapter.assign(index)
        self._set_trainable()

    def _set_trainable(self):
        active = self.active_adapter
        for slot in self._slots.values():
            slot.a.trainable = slot.b.trainable = slot.name == active

    def call(self, inputs, adapter_ids=None, training=None):
        x = tf.convert_to_tensor(inputs)
        with tf.control_dependencies([self._same_adapters_check()]):
            x = tf.identity(x)
        dropout = bool(training) and self.lora_dropout > 0

        def lora_input(x2):
            return tf.nn.dropout(x2, rate=self.lora_dropout) if dropout else x2

        bias = self.bias if self.use_bias else None
        if adapter_ids is None and len(self._slots) == 1:
            slot = self._slots[DEFAULT_ADAPTER]
            on = tf.cast(tf.convert_to_tensor(self.lora_active_adapter) >= 0, slot.scale_var.dtype)
            scale = tf.convert_to_tensor(slot.scale_var) * tf.convert_to_tensor(self.lora_active) * on
            if not dropout:
                y = lora_ops.lora_matmul(x, self.kernel, slot.a, slot.b, scale, bias=bias)
            else:
                y = lora_ops.matmul_then(
                    x,
                    self.kernel,
                    bias,
                    lambda y, x2: lora_ops.lora_apply(y, lora_input(x2), slot.a, slot.b, scale),
                )
        else:
            if adapter_ids is None:
                ids = tf.fill(tf.shape(x)[:-1], tf.convert_to_tensor(self.lora_active_adapter))
                scales = self._stacked_scales() * tf.convert_to_tensor(self.lora_active)
            else:
                ids = adapter_ids
                merged_check = tf.debugging.assert_equal(
                    tf.convert_to_tensor(self.lora_active),
                    tf.constant(1.0, self.lora_active.dtype),
                    message=f"LoraDense {self.name}: an adapter is merged into the kernel; unmerge() before "
                    "serving per-example adapter_ids",
                )
                with tf.control_dependencies([merged_check]):
                    scales = tf.identity(self._stacked_scales())
            a_stack, b_stack = self._stacked_adapters()
            ids = tf.reshape(lora_ops.int32_ids(ids), [-1])
            y = lora_ops.matmul_then(
                x,
                self.kernel,
                bias,
                lambda y, x2: lora_ops.batched_lora_apply(y, lora_input(x2), a_stack, b_stack, ids, scales),
            )
        return self.activation(y) if self.activation is not None else y

    def _same_adapters_check(self):
        """An op that fails when the layer's adapters are not the ones this trace knows (one was added or
        deleted after a tf.function traced the layer: Keras's predict or fit functions keep running the
        old trace, which cannot reach the new adapter's variables)."""
        return tf.debugging.assert_equal(
            tf.convert_to_tensor(self.lora_adapters_version),
            tf.constant(self._adapters_version, tf.int32),
            message=f"LoraDense {self.name}: its adapters changed after this function was traced "
            f"(it knows {self.adapter_names}). Trace again: model.compile(...) resets Keras's fit, evaluate "
            "and predict functions; retrace your own tf.function",
        )

    def _stacked_scales(self):
        return tf.stack([tf.convert_to_tensor(s.scale_var) for s in self._slots.values()])

    def _stacked_adapters(self):
        """[n, in, R] and [n, R, units], each adapter zero-padded to the largest rank R (exact: the padded
        columns of A meet zero rows of B)."""
        top = max(s.rank for s in self._slots.values())
        a = [tf.pad(tf.convert_to_tensor(s.a), [[0, 0], [0, top - s.rank]]) for s in self._slots.values()]
        b = [tf.pad(tf.convert_to_tensor(s.b), [[0, top - s.rank], [0, 0]]) for s in self._slots.values()]
        return tf.stack(a), tf.stack(b)

    def merge(self):
        """Folds the active adapter into the kernel in place (kernel += scale * a @ b)."""
        if self.merged or self.active_adapter is None:
            return
        slot = self._slots[self.active_adapter]
        lora_ops.merge_into_variable(self.kernel, slot.a, slot.b, slot.scale_var)
        self.lora_active.assign(0.0)

    def unmerge(self):
        """Takes the merged adapter out of the kernel again (within rounding)."""
        if self.merged:
            slot = self._slots[self.active_adapter]
            lora_ops.unmerge_from_variable(self.kernel, slot.a, slot.b, slot.scale_var)
            self.lora_active.assign(1.0)

    # Dense saves kernel and bias only (as "0" and "1"); the adapters' variables go by name beside them.
    def _lora_variables(self):
        for slot in self._slots.values():
            yield from (slot.a, slot.b, slot.scale_var)
        yield from (self.lora_active, self.lora_active_adapter)

    def save_own_variables(self, store):
        super().save_own_variables(store)
        for variable in self._lora_variables():
            store[variable.name] = variable

    def load_own_variables(self, store):
        self.kernel.assign(store["0"])
        if self.use_bias:
            self.bias.assign(store["1"])
        for variable in self._lora_variables():
            variable.assign(store[variable.name])
        self._set_trainable()

    def set_adapter(self, a, b, alpha, use_rslora=False, adapter_name=DEFAULT_ADAPTER):
        """Loads weights a [in, rank] and b [rank, units] (the adapter's rank) with their alpha into adapter
        `adapter_name`."""
        slot = self._slot(adapter_name)
        if self.merged and adapter_name == self.active_adapter:
            raise ValueError(f"LoraDense {self.name}: unmerge() before setting another adapter")
        slot.a.assign(a)
        slot.b.assign(b)
        slot.alpha, slot.use_rslora = float(alpha), bool(use_rslora)
        slot.scale_var.assign(slot.scale)

    def get_config(self):
        config = super().get_config()
        config.update(
            rank=self.rank,
            alpha=self.alpha,
            use_rslora=self.use_rslora,
            lora_dropout=self.lora_dropout,
            train_bias=self.train_bias,
            adapters=[s.spec() for s in self._slots.values() if s.name != DEFAULT_ADAPTER],
            active_adapter=self.active_adapter,
        )
        return config
