"""Einsum projections: an `Einsum` whose second input is a kernel variable (keras.layers.EinsumDense, the
attention projections of Keras's MultiHeadAttention and of keras-hub's transformers). Rewrites see the kernel
as a matrix `[in, out]` through the equation, as tf_lora.layers.LoraEinsumDense does (`EinsumView`): `in` is
the kernel's axes the input contracts, `out` the axes the output keeps, each flattened in kernel order (an
update `[in, out]` goes back into the kernel's own layout with EinsumView.to_kernel_layout)."""

from tf_lora.layers.kernel_layout import EinsumView
from tf_lora.rewrite.errors import RewriteError

EINSUM = "Einsum"


def equation(node) -> str:
    return node.attr["equation"].s.decode()


def is_projection(node) -> bool:
    """Whether a node is an Einsum of two operands (the second may then be a kernel variable)."""
    return node.op == EINSUM and len([i for i in node.input if not i.startswith("^")]) == 2


def einsum_view(node, kernel_shape, where) -> EinsumView:
    """The `[in, out]` view of an Einsum node's kernel of `kernel_shape`, for an adapter on its rows.

    The adapter's rows are the input reshaped to `[N, in]` and the output reshaped to `[N, out]` (what
    LoraEinsumDense writes and inject inserts), which holds when the input ends with the axes it contracts and
    the output with the axes it keeps, both in kernel order, after the same row axes: every attention
    projection (`abc,cde->abde`, `abcd,cde->abe`, Gemma's `btd,ndh->btnh`).

    Raises:
      RewriteError: an equation with no `[in, out]` view, or whose rows need a transpose; `where` names the
        node.
    """
    text = equation(node)
    try:
        view = EinsumView.parse(text, kernel_shape, who=where)
    except ValueError as e:
        raise RewriteError(str(e)) from None
    operands, y = text.replace(" ", "").split("->")
    x = operands.split(",")[0].removeprefix("...")
    y = y.removeprefix("...")
    x_rows, y_rows = x[: len(x) - len(view.in_axes)], y[: len(y) - len(view.out_axes)]
    if not (x.endswith(view.in_axes) and y.endswith(view.out_axes) and x_rows == y_rows):
        raise RewriteError(
            f"{where}: equation {text!r}: an adapter needs the input to end with the kernel axes it "
            f"contracts ({view.in_axes!r}) and the output with the kernel axes it keeps ({view.out_axes!r}), "
            f"in kernel order, after the same row axes (input {x!r}, output {y!r}); this Einsum's rows would "
            "need a transpose"
        )
    return view
