"""What the fuzzer knows of each op's inputs, so that a useful share of its calls get past the shape checks.

Per op (its name without the `TfLora>` prefix):
  "<input>": a tuple of dimensions: symbols ("N", "in", ...) share one value per case; "*" stands for any
             number (0-2) of leading dimensions; ints are fixed. "table" / "var" for a resource input.
  "values:<input>": how to draw its values: "ids" (small keys, some extreme), "adapter_ids" (in [-1, n),
             some out of range), "scale" (often 0, 1 or 2), "nonnegative" (mostly >= 0), "counts" (small
             non-negative ints, some extreme).
  "attr:<attr>": the symbol an int attr usually takes (a dim that must agree with the inputs).
  "output:<output>": the dimensions of an output that the inputs' sizes do not bound (x @ a [N, r] from
             empty x and a): cases keep it small enough to allocate, or so large that its shape overflows.
A list input (`k * T`) gets 0 or 1 tensors, one count for the inputs that share a length attr, which the
wrapper infers (it is not drawn).
An op with no entry is still fuzzed (random ranks), and test_fuzz_ops fails until it has one.
"""

_APPLY = {"x": ("N", "in"), "a": ("in", "r"), "b": ("r", "out"), "scale": (), "values:scale": "scale"}
_BATCHED = {
    "x": ("N", "in"),
    "a_stack": ("n", "in", "r"),
    "b_stack": ("n", "r", "out"),
    "adapter_ids": ("N",),
    "scales": ("n",),
    "values:adapter_ids": "adapter_ids",
}

TEMPLATES = {
    "LoraMerge": {
        "w": ("in", "out"),
        "a": ("in", "r"),
        "b": ("r", "out"),
        "scale": (),
        "values:scale": "scale",
    },
    "ResourceLoraMerge": {
        "var": "var",
        "a": ("in", "r"),
        "b": ("r", "out"),
        "scale": (),
        "values:scale": "scale",
    },
    "LoraApply": {"y": ("N", "out"), **_APPLY, "output:xa": ("N", "r")},
    # xa and grad_xa: lists of 0 or 1 tensors (their length is the `saved` attr).
    "LoraApplyGrad": {"grad": ("N", "out"), **_APPLY, "xa": ("N", "r"), "grad_xa": ("N", "r")},
    "BatchedLoraApply": {"y": ("N", "out"), **_BATCHED, "output:xa": ("N", "r")},
    "BatchedLoraApplyGrad": {"grad": ("N", "out"), **_BATCHED, "xa": ("N", "r"), "grad_xa": ("N", "r")},
    "SparseTable": {"attr:dim": "D"},
    "SparseTablePull": {"table": "table", "ids": ("*",), "values:ids": "ids", "attr:dim": "D"},
    "SparseTablePush": {
        "table": "table",
        "ids": ("*",),
        "grads": ("*", "D"),
        "learning_rate": (),
        "values:ids": "ids",
    },
    "SparseTableSize": {"table": "table"},
    "SparseTableExport": {"table": "table"},
    "SparseTableImport": {
        "table": "table",
        "keys": ("K",),
        "values": ("K", "D"),
        "slots": ("K", "S"),
        "update_counts": ("K",),
        "last_steps": ("K",),
        "step": (),
        "values:keys": "ids",
        # Accumulators and counts no push makes negative: mostly drawn as pushes leave them.
        "values:slots": "nonnegative",
        "values:update_counts": "counts",
        "values:step": "counts",
    },
    "SparseTableRemove": {"table": "table", "ids": ("*",), "values:ids": "ids"},
    "SparseTableEvict": {"table": "table", "min_update_count": (), "max_age": ()},
}
