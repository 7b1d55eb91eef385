"""What every tf_lora LoRA layer shares: named adapters with their variables (DoRA's magnitude included),
the active adapter, merging, per-example adapter ids, saving. A layer class mixes `LoraAdapters` into a Keras
Dense, EinsumDense or Embedding; its weight is seen as a matrix `[in, out]` through
tf_lora.layers.kernel_layout."""

import contextlib
import dataclasses
import math
import re
import threading

import keras
import tensorflow as tf
from keras.src.backend.common.variables import AutocastScope  # private; Keras has no public way

from tf_lora.layers.kernel_layout import (
    adapted_norm,
    kernel_matrix,
    kernel_variable,
    lora_shape,
    merge_into_layer,
    set_kernel_matrix,
)
from tf_lora.python.ops import lora_ops

DEFAULT_ADAPTER = "default"
# What an adapter name may be (it becomes part of variable names).
ADAPTER_NAME = re.compile(r"\w+")

_ids_context = threading.local()


@contextlib.contextmanager
def adapter_ids(ids):
    """Gives each example its own adapter in every tf_lora LoRA layer called inside the block, however deep
    the layer sits (a keras-hub backbone's attention projections take no `adapter_ids` argument).

    `ids[i]` indexes the layers' `adapter_names` (-1: the base model only) and covers all rows of example
    `i` (sequence positions included). The ids are read when the layers are called: inside a `tf.function`
    the block goes inside the traced function, with the ids as one of its arguments (a block of values around
    a traced call is refused: a call that traces would freeze them, one traced before would ignore them, and
    a block that no layer read is an error when it closes); `PerExampleAdapters` wraps a model that way.

    >>> layer = tf_lora.layers.LoraDense(3, rank=2)
    >>> model = keras.Sequential([keras.Input((4,)), keras.Sequential([layer])])  # one level down
    >>> layer.add_adapter("other")
    >>> with tf_lora.layers.adapter_ids([1, -1]):  # example 0: "other", example 1: the base layer
    ...     model(tf.ones([2, 4])).shape
    TensorShape([2, 3])
    """
    stack = getattr(_ids_context, "stack", None)
    if stack is None:
        stack = _ids_context.stack = []
    block = _IdsBlock(ids)
    stack.append(block)
    try:
        yield
    finally:
        stack.pop()
    if not block.reached and not tf.is_symbolic_tensor(ids):
        # No LoRA layer read the ids: the block was around a function traced before it (Keras's predict
        # after its first call, generate), which ran as traced, with the layers' active adapters.
        raise ValueError(
            "adapter_ids: no tf_lora LoRA layer was called inside this block of ids, so they were not used: "
            "a function traced before the block (Keras's predict or generate after a first call, a "
            "tf.function) runs as it was traced, with the layers' active adapters, whatever block is "
            "around it. Pass the ids as an argument of the traced function and open the block inside it, or "
            "wrap the model in tf_lora.layers.PerExampleAdapters(model), whose call takes (inputs, "
            "adapter_ids)"
        )


@dataclasses.dataclass
class _IdsBlock:
    """An `adapter_ids` block: its ids, and the adapter names of the first layer called in it, with who."""

    ids: object
    names: tuple = None
    first: str = None
    reached: bool = False  # a layer call read the ids


def resolve_adapter_ids(adapter_ids, who, names=()):
    """The ids a layer call uses: its own `adapter_ids`, else the innermost `adapter_ids` block's. While a
    function is traced, a block's ids must be a tensor of that trace (an argument of the tf.function, the
    block opened inside it): values would be frozen into the trace, and the next call with other ids would
    silently run the old ones.

    A block's ids index each layer's own `names` (its adapter_names), so the layers called in one block must
    agree on them as far as both go: an id must not be one adapter in one layer and another elsewhere (a
    layer with fewer adapters refuses the ids past them when it runs)."""
    if adapter_ids is not None:
        return adapter_ids
    stack = getattr(_ids_context, "stack", None)
    for block in stack or ():  # the innermost block's ids are used; the outer blocks were reached too
        block.reached = True
    if stack and names:
        block, names = stack[-1], tuple(names)
        if block.names is None:
            block.names, block.first = names, who
        else:
            for i, (here, there) in enumerate(zip(names, block.names, strict=False)):
                if here != there:
                    raise ValueError(
                        f"{who}: inside an adapter_ids block, id {i} is adapter {here!r} here but {there!r} "
                        f"in {block.first} (adapter_names {list(names)} and {list(block.names)}): the ids "
                        "index each layer's adapter_names, so the layers must hold their adapters in the "
                        "same order (add or load them in the same order everywhere)"
                    )
    ids = context_adapter_ids()
    if ids is not None and not tf.executing_eagerly() and not tf.is_symbolic_tensor(ids):
        raise ValueError(
            f"{who}: called in a traced function (tf.function, Keras's predict or fit) inside an adapter_ids "
            "block whose ids are values, which the trace would freeze: later calls with other ids would run "
            "these. Pass the ids as an argument of your tf.function and open the block inside it, or wrap "
            "the model in tf_lora.layers.PerExampleAdapters(model), whose call takes (inputs, adapter_ids)"
        )
    return ids


def broadcast_ids(ids, batch_shape, who):
    """One id per example covering all its rows: ids [examples] (or [examples, positions...]) broadcast to
    the rows' leading axes `batch_shape` (a tensor), after checking that they fit."""
    rank = ids.shape.rank
    fits = tf.debugging.assert_equal(
        tf.shape(ids),
        batch_shape[:rank],
        message=f"{who}: adapter_ids must have one id per example (shape = the input's leading axes)",
    )
    with tf.control_dependencies([fits]):
        ids = tf.reshape(ids, tf.concat([tf.shape(ids), tf.ones_like(batch_shape[rank:])], 0))
    return tf.broadcast_to(ids, batch_shape)


def context_adapter_ids():
    """The ids of the innermost `adapter_ids` block, or None."""
    stack = getattr(_ids_context, "stack", None)
    return stack[-1].ids if stack else None


@dataclasses.dataclass
class Slot:
    """One named adapter of a LoRA layer: its hyper-parameters and (once built) its variables."""

    name: str
    rank: int
    alpha: float
    use_rslora: bool
    use_dora: bool = False
    a: keras.Variable = None
    b: keras.Variable = None
    scale_var: keras.Variable = None
    magnitude: keras.Variable = None  # DoRA: [out]
    weight_norm: keras.Variable = None  # DoRA: the column norms the merge divided by, for unmerge

    @property
    def variables(self):
        extra = (self.magnitude, self.weight_norm) if self.use_dora else ()
        return (self.a, self.b, self.scale_var, *extra)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def spec(self) -> dict:
        spec = {"name": self.name, "rank": self.rank, "alpha": self.alpha, "use_rslora": self.use_rslora}
        return {**spec, "use_dora": True} if self.use_dora else spec


def keras_lora_names(layer_name, rank, alpha, lora_rank, lora_alpha):
    """(rank, alpha) from tf_lora's names or Keras's (`lora_rank`, `lora_alpha`, whose alpha defaults to the
    rank, as in Keras). Each may be given once; tf_lora's defaults are rank 8, alpha 16."""
    if lora_rank is not None:
        if rank is not None and int(rank) != int(lora_rank):
            raise ValueError(
                f"{layer_name}: rank={rank} and Keras's lora_rank={lora_rank} disagree; give one"
            )
        rank = lora_rank
    if lora_alpha is not None:
        if alpha is not None and float(alpha) != float(lora_alpha):
            raise ValueError(
                f"{layer_name}: alpha={alpha} and Keras's lora_alpha={lora_alpha} disagree; give one"
            )
        alpha = lora_alpha
    if alpha is None:
        alpha = rank if lora_rank is not None else 16.0
    return (8 if rank is None else rank), alpha


class LoraAdapters:
    """Named LoRA adapters on a Keras layer whose weight (`kernel`) is frozen, as in PEFT.

    The adapters' update is `scale * a @ b` on the weight seen as `[in, out]`. The class using it calls
    `_lora_setup` from its constructor (or when converting a built layer in place), `_lora_build` once the
    weight exists, and `_lora_rows` on its output rows; the weight is read and written as `[in, out]` through
    tf_lora.layers.kernel_layout.

    >>> isinstance(tf_lora.layers.LoraEinsumDense("abc,cd->abd", (None, 4)), tf_lora.layers.LoraAdapters)
    True
    """

    def _lora_setup(
        self,
        rank,
        alpha,
        use_rslora,
        lora_dropout,
        adapters,
        active_adapter,
        train_bias,
        kind="LoRA layer",
        use_dora=False,
    ):
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"{kind}: lora_dropout must be in [0, 1), got {lora_dropout}")
        self.lora_dropout = float(lora_dropout)
        self.train_bias = bool(train_bias)
        self._adapters_version = 0
        self._slots = {}
        self._add_slot(DEFAULT_ADAPTER, rank, alpha, use_rslora, use_dora)
        for spec in adapters:
            self._add_slot(**spec)
        if active_adapter is not None:
            self._slot(active_adapter)
        self._initial_active = active_adapter

    # The default adapter's hyper-parameters, under the names the constructors take.
    rank = property(lambda self: self._slots[DEFAULT_ADAPTER].rank)
    alpha = property(lambda self: self._slots[DEFAULT_ADAPTER].alpha)
    use_rslora = property(lambda self: self._slots[DEFAULT_ADAPTER].use_rslora)
    use_dora = property(lambda self: self._slots[DEFAULT_ADAPTER].use_dora)
    scale = property(lambda self: self._slots[DEFAULT_ADAPTER].scale)

    @property
    def adapter_names(self) -> list:
        """The adapters in id order: `adapter_ids` index this list."""
        return list(self._slots)

    def _describe(self):
        return f"{type(self).__name__} {self.name}"

    def _add_slot(self, name, rank, alpha, use_rslora=False, use_dora=False):
        if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
            raise ValueError(
                f"{self._describe()}: an adapter name must be letters, digits or _, got {name!r}"
            )
        if name in self._slots:
            raise ValueError(f"{self._describe()}: adapter {name!r} exists already ({self.adapter_names})")
        if int(rank) < 1:
            raise ValueError(f"{self._describe()}: rank must be >= 1, got {rank} for adapter {name!r}")
        slot = Slot(name, int(rank), float(alpha), bool(use_rslora), bool(use_dora))
        self._slots[name] = slot
        if self.built and getattr(self, "lora_active", None) is not None:
            # Keras locks a built layer's state; its own enable_lora unlocks it the same way.
            self._tracker.unlock()
            try:
                self._build_slot(slot, trainable=False)
            finally:
                self._tracker.lock()
            self._adapters_version += 1
            self.lora_adapters_version.assign(self._adapters_version)
        return slot

    def _build_slot(self, slot, trainable):
        # The default adapter's variables keep the plain names lora_a, lora_b and lora_scale. Each variable is
        # also an attribute of the layer, which is how tf.saved_model finds what traced functions capture.
        in_features, out_features = lora_shape(self)
        suffix = "" if slot.name == DEFAULT_ADAPTER else f"_{slot.name}"
        # Created trainable: the tf.Variable under a Keras variable keeps its creation-time flag, and only a
        # trainable one is watched by gradient tapes; Keras's own flag then says whether it is trained.
        slot.a = self.add_weight(
            name=f"lora_a{suffix}", shape=(in_features, slot.rank), initializer=keras.initializers.HeUniform()
        )
        slot.b = self.add_weight(name=f"lora_b{suffix}", shape=(slot.rank, out_features), initializer="zeros")
        slot.a.trainable = slot.b.trainable = trainable
        # The scale is a variable so that an adapter loaded later with another alpha reaches traced functions.
        slot.scale_var = self.add_weight(
            name=f"lora_scale{suffix}",
            shape=(),
            initializer=keras.initializers.Constant(slot.scale),
            trainable=False,
        )
        if slot.use_dora:
            # DoRA's magnitude starts as the weight's column norms (B = 0), as PEFT initializes it.
            slot.magnitude = self.add_weight(name=f"lora_magnitude{suffix}", shape=(out_features,))
            slot.magnitude.assign(tf.norm(tf.cast(kernel_matrix(self), tf.float32), axis=0))
            slot.magnitude.trainable = trainable
            slot.weight_norm = self.add_weight(
                name=f"lora_weight_norm{suffix}", shape=(out_features,), initializer="ones", trainable=False
            )
        for variable in slot.variables:
            setattr(self, variable.name, variable)

    def _lora_build(self):
        """Freezes the weight (and the bias unless train_bias) and creates the adapters' variables."""
        kernel_variable(self).trainable = False
        bias = getattr(self, "bias", None)
        if bias is not None:
            bias.trainable = self.train_bias
        for slot in self._slots.values():
            self._build_slot(slot, trainable=slot.name == self._initial_active)
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

    def _slot(self, name) -> Slot:
        if name not in self._slots:
            raise ValueError(f"{self._describe()}: no adapter {name!r} (adapters: {self.adapter_names})")
        return self._slots[name]

    def adapter_slot(self, name=DEFAULT_ADAPTER) -> Slot:
        """Adapter `name`'s hyper-parameters and variables (`a` [in, r], `b` [r, out], `scale_var`)."""
        return self._slot(name)

    def add_adapter(self, name, rank=None, alpha=None, use_rslora=None, use_dora=False):
        """Adds an adapter (B at zero, so it starts as the base layer); rank, alpha and rsLoRA default to the
        default adapter's. It is not active, nor trained, until `set_active_adapter(name)`. A new adapter
        changes the layer's variables: compile the model again before `fit`. A DoRA adapter (`use_dora`)
        is served alone: a layer holding one takes no per-example adapter ids."""
        default = self._slots[DEFAULT_ADAPTER]
        self._add_slot(
            name,
            default.rank if rank is None else rank,
            default.alpha if alpha is None else alpha,
            default.use_rslora if use_rslora is None else use_rslora,
            use_dora,
        )

    def delete_adapter(self, name):
        """Removes adapter `name` and its variables; the default adapter stays, and so does one that is
        merged into the kernel. Ids of the adapters after it shift down by one."""
        slot = self._slot(name)
        if name == DEFAULT_ADAPTER:
            raise ValueError(f"{self._describe()}: the default adapter cannot be deleted")
        active = self.active_adapter
        if active == name and self.merged:
            raise ValueError(f"{self._describe()}: adapter {name!r} is merged; unmerge() before deleting it")
        del self._slots[name]
        if active == name:
            self._initial_active = None
        if self.built:
            for variable in slot.variables:
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
                f"{self._describe()}: adapter {self.active_adapter!r} is merged; unmerge() before switching"
            )
        self.lora_active_adapter.assign(index)
        self._set_trainable()

    def quantize(self, mode=None, type_check=True, config=None):
        """Refused: Keras's quantization rewrites the weight and the call, and would drop the adapters
        (Keras's `model.quantize` catches only NotImplementedError, so this error stops it)."""
        if not isinstance(self, LoraAdapters):  # unloaded since Keras bound this method: the plain layer's
            return type(self).quantize(self, mode=mode, type_check=type_check, config=config)
        raise ValueError(
            f"{self._describe()}: quantizing ({mode}) a LoRA layer would drop its adapters (Keras's "
            "quantized call does not apply them): merge them first and quantize the plain model "
            "(tf_lora.merge_and_unload(model), then model.quantize(...))"
        )

    def _set_trainable(self):
        # The active adapter trains, unless it is merged into the kernel: it then has no effect on the
        # output, and an optimizer that still moved it (weight decay, momentum) would make unmerge() take
        # out another update than the one merged.
        merged = getattr(self, "lora_active", None) is not None and tf.executing_eagerly() and self.merged
        active = None if merged else self.active_adapter
        for slot in self._slots.values():
            slot.a.trainable = slot.b.trainable = slot.name == active
            if slot.use_dora:
                slot.magnitude.trainable = slot.name == active

    def _lora_rows(self, x, adapter_ids, training):
        """The function `(y2, x2) -> y2 + LoRA` on output rows y2 [N, out] of input rows x2 [N, in], for the
        active adapter, or each row's own one when `adapter_ids` (or an `adapter_ids` block) gives them; `x`
        is the layer's input, whose leading axes the ids cover. Also checks the adapters the trace knows."""
        adapter_ids = resolve_adapter_ids(adapter_ids, self._describe(), self.adapter_names)
        dropout = bool(training) and self.lora_dropout > 0

        def lora_input(x2):
            return tf.nn.dropout(x2, rate=self.lora_dropout) if dropout else x2

        self._check_dora_alone(adapter_ids)
        if adapter_ids is None and len(self._slots) == 1:
            slot = self._slots[DEFAULT_ADAPTER]
            on = tf.cast(tf.convert_to_tensor(self.lora_active_adapter) >= 0, slot.scale_var.dtype)
            live = tf.convert_to_tensor(self.lora_active) * on  # 0 once merged, or with no adapter active
            scale = tf.convert_to_tensor(slot.scale_var) * live
            if not slot.use_dora:
                return lambda y2, x2: lora_ops.lora_apply(y2, lora_input(x2), slot.a, slot.b, scale)

            def dora_rows(y2, x2):
                y2 = lora_ops.lora_apply(y2, lora_input(x2), slot.a, slot.b, scale)
                return y2 * tf.cast(self._dora_factor(slot, live), y2.dtype)

            return dora_rows
        if adapter_ids is None:
            ids = tf.fill(tf.shape(x)[:-1], tf.convert_to_tensor(self.lora_active_adapter))
            scales = self._stacked_scales() * tf.convert_to_tensor(self.lora_active)
        else:
            ids = lora_ops.int32_ids(adapter_ids)
            if ids.shape.rank is not None and x.shape.rank is not None and ids.shape.rank < x.shape.rank - 1:
                # One id per example covers all its rows (sequence positions, heads...).
                ids = broadcast_ids(ids, tf.shape(x)[:-1], self._describe())
            with tf.control_dependencies([self._not_merged_check()]):
                scales = tf.identity(self._stacked_scales())
        a_stack, b_stack = self._stacked_adapters()
        ids = tf.reshape(ids, [-1])
        return lambda y2, x2: lora_ops.batched_lora_apply(y2, lora_input(x2), a_stack, b_stack, ids, scales)

    def _check_dora_alone(self, adapter_ids):
        dora = [slot.name for slot in self._slots.values() if slot.use_dora]
        if dora and (adapter_ids is not None or len(self._slots) > 1):
            raise ValueError(
                f"{self._describe()}: DoRA adapter {dora[0]!r} is served alone: a layer holding a DoRA "
                f"adapter takes no per-example adapter ids, nor other adapters (it has {self.adapter_names})"
            )

    def _dora_factor(self, slot, live):
        """PEFT's DoRA column factor, magnitude / ||w + scale * a @ b|| ([out]; no gradient through the norm;
        1 where the adapter is off: `live` 0), which multiplies x @ (w + scale * a @ b), the bias after. In
        the norm's dtype (float32, float64 for a float64 weight), from the variables as stored: under a
        mixed policy Keras would read them rounded to the compute dtype, and a fresh adapter (B = 0) would
        then scale the base output by bf16(||w||) / ||bf16(w)|| instead of 1."""
        with AutocastScope(None):
            norm = tf.stop_gradient(adapted_norm(self, slot.a, slot.b, slot.scale_var))
            factor = tf.cast(slot.magnitude, norm.dtype) / norm
        return tf.where(live > 0, factor, tf.ones_like(factor))

    def _not_merged_check(self):
        """An op that fails when an adapter is merged into the weight (per-example ids then cannot work)."""
        return tf.debugging.assert_equal(
            tf.convert_to_tensor(self.lora_active),
            tf.constant(1.0, self.lora_active.dtype),
            message=f"{self._describe()}: an adapter is merged into the kernel; unmerge() before serving "
            "per-example adapter_ids",
        )

    def _same_adapters_check(self):
        """An op that fails when the layer's adapters are not the ones this trace knows (one was added or
        deleted after a tf.function traced the layer: Keras's predict or fit functions keep running the
        old trace, which cannot reach the new adapter's variables)."""
        return tf.debugging.assert_equal(
            tf.convert_to_tensor(self.lora_adapters_version),
            tf.constant(self._adapters_version, tf.int32),
            message=f"{self._describe()}: its adapters changed after this function was traced "
            f"(it knows {self.adapter_names}). Trace again: model.compile(...) resets Keras's fit, evaluate "
            "and predict functions; retrace your own tf.function",
        )

    def _checked_input(self, inputs):
        x = tf.convert_to_tensor(inputs)
        with tf.control_dependencies([self._same_adapters_check()]):
            return tf.identity(x)

    def _stacked_scales(self):
        return tf.stack([tf.convert_to_tensor(s.scale_var) for s in self._slots.values()])

    def _stacked_adapters(self):
        """[n, in, R] and [n, R, out], each adapter zero-padded to the largest rank R (exact: the padded
        columns of A meet zero rows of B)."""
        top = max(s.rank for s in self._slots.values())
        a = [tf.pad(tf.convert_to_tensor(s.a), [[0, 0], [0, top - s.rank]]) for s in self._slots.values()]
        b = [tf.pad(tf.convert_to_tensor(s.b), [[0, top - s.rank], [0, 0]]) for s in self._slots.values()]
        return tf.stack(a), tf.stack(b)

    def merge(self):
        """Folds the active adapter into the kernel in place (kernel += scale * a @ b); the adapter is frozen
        while merged (trainable again after unmerge; a compiled model needs a new `compile` to see it)."""
        if self.merged or self.active_adapter is None:
            return
        slot = self._slots[self.active_adapter]
        self._merge_slot(slot, 1.0)
        self.lora_active.assign(0.0)
        # What was trainable comes back with unmerge (a hand-frozen A, as LoRA-FA trains, stays frozen). Kept
        # out of Keras's attribute tracking: names and flags only.
        self.__dict__["_trainable_before_merge"] = {v.name: v.trainable for v in slot.variables}
        self._set_trainable()

    def unmerge(self):
        """Takes the merged adapter out of the kernel again (within rounding)."""
        if self.merged:
            slot = self._slots[self.active_adapter]
            self._merge_slot(slot, -1.0)
            self.lora_active.assign(1.0)
            self._set_trainable()
            before = self.__dict__.pop("_trainable_before_merge", {})
            for variable in slot.variables:
                variable.trainable = before.get(variable.name, variable.trainable)

    def _merge_slot(self, slot, sign):
        if not slot.use_dora:
            scale = sign * tf.convert_to_tensor(slot.scale_var)
            merge_into_layer(self, slot.a, slot.b, scale)
        elif (
            sign > 0
        ):  # PEFT's merge: w <- m / ||w'|| * w', w' = w + scale * a @ b, the norms kept for unmerge
            slot.weight_norm.assign(merge_into_layer(self, slot.a, slot.b, slot.scale_var, slot.magnitude))
        else:  # its inverse: w = w_merged * ||w'|| / m - scale * a @ b
            w = kernel_matrix(self)
            dtype = tf.float64 if w.dtype == tf.float64 else tf.float32  # as adapted_norm
            factor = tf.cast(slot.weight_norm, dtype) / tf.cast(slot.magnitude, dtype)
            update = tf.matmul(tf.cast(slot.a, dtype), tf.cast(slot.b, dtype)) * tf.cast(
                slot.scale_var, dtype
            )
            set_kernel_matrix(self, tf.cast(w, dtype) * factor - update)

    def set_adapter(self, a, b, alpha, use_rslora=False, adapter_name=DEFAULT_ADAPTER, magnitude=None):
        """Loads weights a [in, rank] and b [rank, out] (the adapter's rank) with their alpha into adapter
        `adapter_name`; a DoRA adapter also takes its `magnitude` [out]."""
        slot = self._slot(adapter_name)
        if (magnitude is not None) != slot.use_dora:
            raise ValueError(
                f"{self._describe()}: adapter {adapter_name!r} is "
                + (
                    "DoRA and needs a magnitude"
                    if slot.use_dora
                    else "plain LoRA; a DoRA magnitude does not fit"
                )
            )
        if self.merged and adapter_name == self.active_adapter:
            raise ValueError(f"{self._describe()}: unmerge() before setting another adapter")
        slot.a.assign(a)
        slot.b.assign(b)
        slot.alpha, slot.use_rslora = float(alpha), bool(use_rslora)
        slot.scale_var.assign(slot.scale)
        if magnitude is not None:
            slot.magnitude.assign(magnitude)

    # Keras saves the weight and bias as "0" and "1"; the adapters' variables go by name beside them.
    def _lora_variables(self):
        for slot in self._slots.values():
            yield from slot.variables
        yield from (self.lora_active, self.lora_active_adapter)

    def _save_lora_variables(self, store):
        for variable in self._lora_variables():
            store[variable.name] = variable

    def _load_lora_variables(self, store):
        for variable in self._lora_variables():
            variable.assign(store[variable.name])
        self._set_trainable()

    def _lora_config(self):
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "lora_dropout": self.lora_dropout,
            "train_bias": self.train_bias,
            "adapters": [s.spec() for s in self._slots.values() if s.name != DEFAULT_ADAPTER],
            "active_adapter": self.active_adapter,
        }
