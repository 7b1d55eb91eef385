"""Inputs that once crashed or hung a kernel, called through the generated raw-op wrappers (no Python checks
in the way). Each reproducer that could kill or stall the process runs in a fresh interpreter (run_python),
whose timeout is a hang detector: the work it bounds takes milliseconds when right, hours or forever when
not."""

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.ops import gen_resource_variable_ops

from tf_lora.python.ops import gen_lora_ops, gen_sparse_table_ops

_RAW = (
    "from tf_lora.python.ops import gen_lora_ops as L, gen_sparse_table_ops as S\nimport tensorflow as tf\n"
)


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adam", "ftrl"])
def test_a_table_too_wide_for_its_rows_is_refused_not_crashed_or_hung(run_python, optimizer):
    # dim * (1 + slots) used to wrap: with sgd/adagrad the block-size loop never ended (holding TensorFlow's
    # resource-manager lock), with adam/ftrl export and import aborted on a negative slot width.
    out = run_python(
        _RAW
        + f"""
for dim in [2**20 + 1, 2**60, 2**62, 2**63 - 1]:
    try:
        h = S.tf_lora_sparse_table(
            dim=dim, initializer="zeros", optimizer="{optimizer}", shared_name=f"w{{dim}}")
        S.tf_lora_sparse_table_export(h)
        no_keys = tf.zeros([0], tf.int64)
        S.tf_lora_sparse_table_import(h, no_keys, tf.zeros([0, 1]), tf.zeros([0, 1]), no_keys, no_keys,
                                      tf.constant(0, tf.int64))
        print("accepted", dim)
    except tf.errors.InvalidArgumentError as e:
        print("refused", dim, "dim must be in [1, 1048576]" in str(e))
# The largest dim allowed still makes a working table.
h = S.tf_lora_sparse_table(dim=2**20, initializer="zeros", optimizer="{optimizer}", shared_name="widest")
S.tf_lora_sparse_table_push(h, tf.constant([5], tf.int64), tf.ones([1, 2**20]), 1.0)
keys, values, slots, counts, steps, step = S.tf_lora_sparse_table_export(h)
print("widest", keys.numpy().tolist(), values.shape, slots.shape[1] % 2**20)
""",
        timeout=120,
    )
    lines = out.splitlines()
    assert lines[:4] == [f"refused {d} True" for d in [2**20 + 1, 2**60, 2**62, 2**63 - 1]], out
    assert lines[4] == "widest [5] (1, 1048576) 0", out


def test_a_hung_table_creation_no_longer_blocks_other_resources(run_python):
    # The creation ran under the resource manager's lock: variables of the same process hung with it.
    out = run_python(
        _RAW
        + """
v = tf.Variable([1.0, 2.0])
try:
    S.tf_lora_sparse_table(dim=2**62, initializer="zeros", optimizer="sgd", shared_name="h")
except tf.errors.InvalidArgumentError:
    pass
print(v.numpy().tolist())
""",
        timeout=120,
    )
    assert out.strip() == "[1.0, 2.0]"


@pytest.mark.parametrize("batched", [False, True])
def test_gradient_of_empty_work_with_a_huge_rank_is_zeros_not_a_crash(run_python, batched):
    # r near 2^63 with in = out = 0: NumTiles(r) overflowed and the scratch vectors threw std::length_error
    # (SIGSEGV eagerly, std::terminate in a graph).
    if batched:
        r = 2**61  # [2, r, 0] must itself be a valid shape
        inputs = f"[tf.zeros([3, 0]), tf.zeros([3, 0]), tf.zeros([2, 0, {r}]), tf.zeros([2, {r}, 0]), "
        inputs += "tf.constant([0, 1, -1]), tf.ones([2]), [], []]"
        op, shapes, dscale = "L.tf_lora_batched_lora_apply_grad", [[3, 0], [2, 0, r], [2, r, 0]], [0.0, 0.0]
    else:
        r = 2**63 - 1
        inputs = f"[tf.zeros([3, 0]), tf.zeros([3, 0]), tf.zeros([0, {r}]), tf.zeros([{r}, 0]), "
        inputs += "tf.constant(1.0), [], []]"
        op, shapes, dscale = "L.tf_lora_lora_apply_grad", [[3, 0], [0, r], [r, 0]], 0.0
    out = run_python(
        _RAW
        + f"""
inputs = {inputs}
for run in [{op}, tf.function(lambda *t: {op}(*t))]:
    dx, da, db, dscale = run(*inputs)
    print([t.shape.as_list() for t in (dx, da, db)], dscale.numpy().tolist())
""",
        timeout=120,
    )
    assert out.splitlines() == [f"{shapes} {dscale}"] * 2, out


@pytest.mark.parametrize(
    "batched, n, in_, out_, r",
    [
        (False, 2**40, 0, 0, 4),  # N rows of nothing: used to walk every row (2^30 took 28 s)
        (False, 3, 0, 0, 2**40),  # rank of nothing: used to size scratch by r (2^34 took 29 s)
        (False, 2**40, 0, 0, 2**22),
        # ids [N] are real data, so N stays small for the batched op; r carries the size.
        (True, 3, 0, 0, 2**40),
    ],
)
def test_gradient_of_empty_work_returns_at_once(run_python, batched, n, in_, out_, r):
    # The timeout bounds what takes milliseconds now and took hours before.
    if batched:
        call = (
            f"L.tf_lora_batched_lora_apply_grad(tf.zeros([{n}, {out_}]), tf.zeros([{n}, {in_}]), "
            f"tf.zeros([2, {in_}, {r}]), tf.zeros([2, {r}, {out_}]), tf.constant([0, 1, 1]), tf.ones([2]), "
            "[], [])"
        )
    else:
        call = (
            f"L.tf_lora_lora_apply_grad(tf.zeros([{n}, {out_}]), tf.zeros([{n}, {in_}]), "
            f"tf.zeros([{in_}, {r}]), tf.zeros([{r}, {out_}]), 1.0, [], [])"
        )
    out = run_python(_RAW + f"print(float(tf.reduce_sum({call}[3])))", timeout=120)
    assert out.strip() == "0.0"


def test_gradient_with_rows_but_nothing_to_multiply_is_zeros():
    # N >= 1, in = out = 0 and r >= 2^31 used to be refused as ResourceExhausted: valid input, all zeros.
    dx, da, db, dscale = gen_lora_ops.tf_lora_lora_apply_grad(
        tf.zeros([5, 0]), tf.zeros([5, 0]), tf.zeros([0, 2**31]), tf.zeros([2**31, 0]), 2.0, [], []
    )
    assert (dx.shape, da.shape, db.shape, float(dscale)) == ((5, 0), (0, 2**31), (2**31, 0), 0.0)


@pytest.mark.parametrize("in_, out_, r", [(0, 6, 3), (4, 0, 3), (4, 6, 0)])
def test_gradient_with_one_empty_factor_is_exact_zeros(in_, out_, r):
    # Outputs with elements (dx [N, in], da [in, r], db [r, out]) must be written, with zeros.
    rng = np.random.default_rng(0)
    g = rng.normal(size=[5, out_]).astype(np.float32)
    x = rng.normal(size=[5, in_]).astype(np.float32)
    a = rng.normal(size=[in_, r]).astype(np.float32)
    b = rng.normal(size=[r, out_]).astype(np.float32)
    dx, da, db, dscale = gen_lora_ops.tf_lora_lora_apply_grad(g, x, a, b, 1.5, [], [])
    # The reference: autodiff of the same expression through TensorFlow's own ops.
    xt, at, bt, s = (tf.constant(v) for v in (x, a, b, np.float32(1.5)))
    with tf.GradientTape() as tape:
        tape.watch([xt, at, bt, s])
        y = s * tf.matmul(tf.matmul(xt, at), bt)
    want = tape.gradient(y, [xt, at, bt, s], output_gradients=tf.constant(g))
    for got, ref in zip((dx, da, db, dscale), want, strict=True):
        np.testing.assert_array_equal(got.numpy(), ref.numpy())


def _table(name):
    return gen_sparse_table_ops.tf_lora_sparse_table(
        dim=2, initializer="zeros", optimizer="sgd", shared_name=name
    )


def test_an_empty_handle_tensor_is_refused_by_every_stateful_op():
    # HandleFromInput reads element 0 unchecked: a [0] handle read out of bounds (and happened to find the
    # resource). Every kernel now checks the handle is a scalar.
    table = _table("empty_handle")
    var = tf.Variable(tf.zeros([2, 3]))
    ids = tf.constant([1], tf.int64)
    calls = {
        "SparseTablePull": lambda h: gen_sparse_table_ops.tf_lora_sparse_table_pull(h, ids, dim=2),
        "SparseTablePush": lambda h: gen_sparse_table_ops.tf_lora_sparse_table_push(
            h, ids, tf.ones([1, 2]), 0.1
        ),
        "SparseTableSize": gen_sparse_table_ops.tf_lora_sparse_table_size,
        "SparseTableExport": lambda h: gen_sparse_table_ops.tf_lora_sparse_table_export(h)[0],
        "SparseTableImport": lambda h: gen_sparse_table_ops.tf_lora_sparse_table_import(
            h,
            ids,
            tf.ones([1, 2]),
            tf.zeros([1, 0]),
            tf.zeros([1], tf.int64),
            tf.zeros([1], tf.int64),
            tf.constant(0, tf.int64),
        ),
        "SparseTableRemove": lambda h: gen_sparse_table_ops.tf_lora_sparse_table_remove(h, ids),
        "SparseTableEvict": lambda h: gen_sparse_table_ops.tf_lora_sparse_table_evict(
            h, tf.constant(5, tf.int64), tf.constant(-1, tf.int64)
        ),
    }
    for op, call in calls.items():

        @tf.function
        def run(call=call):
            call(tf.stack([table])[:0])  # stateful: runs though nothing is returned

        with pytest.raises(
            tf.errors.InvalidArgumentError, match=f"{op}: table must be a scalar resource handle"
        ):
            run()

    @tf.function
    def merge():
        gen_lora_ops.tf_lora_resource_lora_merge(
            tf.stack([var.handle])[:0], tf.ones([2, 1]), tf.ones([1, 3]), 1.0
        )

    with pytest.raises(
        tf.errors.InvalidArgumentError, match="ResourceLoraMerge: var must be a scalar resource handle"
    ):
        merge()
    # Nothing was changed through the bad handles.
    assert int(gen_sparse_table_ops.tf_lora_sparse_table_size(table)) == 0
    np.testing.assert_array_equal(var.numpy(), np.zeros([2, 3]))


def test_a_destroyed_table_is_created_afresh_by_the_same_op():
    # The kernel cached its handle: after DestroyResourceOp the next run handed out the destroyed table's
    # handle, and the next op failed "does not exist". TensorFlow's MutableHashTableV2 makes a new table.
    make = tf.function(lambda: _table("destroyed"))
    for _ in range(2):
        handle = make()
        gen_sparse_table_ops.tf_lora_sparse_table_push(
            handle, tf.constant([7], tf.int64), tf.ones([1, 2]), 1.0
        )
        assert int(gen_sparse_table_ops.tf_lora_sparse_table_size(handle)) == 1
        gen_resource_variable_ops.destroy_resource_op(handle)
    # Eagerly too, and the new table starts empty.
    handle = _table("destroyed_eager")
    gen_sparse_table_ops.tf_lora_sparse_table_push(handle, tf.constant([7], tf.int64), tf.ones([1, 2]), 1.0)
    gen_resource_variable_ops.destroy_resource_op(handle)
    handle = _table("destroyed_eager")
    assert int(gen_sparse_table_ops.tf_lora_sparse_table_size(handle)) == 0
    np.testing.assert_array_equal(
        gen_sparse_table_ops.tf_lora_sparse_table_pull(handle, tf.constant([7], tf.int64), dim=2).numpy(),
        [[0, 0]],
    )


def test_apply_with_no_input_columns_outputs_zeros_for_x_at_a_or_refuses_a_shape_that_cannot_be(run_python):
    # LoraApply's second output, x @ a [N, r], exists even where x [N, 0] and a [0, r] hold nothing: zeros
    # where [N, r] can be allocated; [2^61, 2^31 + 1] cannot be a shape at all (the fuzzer's case: it aborted
    # on TensorShape's overflow check before the kernel built the shape with a status).
    out = run_python(
        _RAW
        + """
for run in [L.tf_lora_lora_apply, tf.function(L.tf_lora_lora_apply)]:
    y_out, xa = run(tf.ones([3, 5]), tf.zeros([3, 0]), tf.zeros([0, 4]), tf.zeros([4, 5]), tf.constant(1.0))
    print(y_out.numpy().sum(), xa.shape.as_list(), float(tf.reduce_max(tf.abs(xa))))
    try:
        n, r = 2**61, 2**31 + 1
        run(tf.zeros([n, 0]), tf.zeros([n, 0]), tf.zeros([0, r]), tf.zeros([r, 0]), tf.constant(1.0))
    except tf.errors.InvalidArgumentError as e:
        print("refused", f"x @ a output [N, r] = [{n}, {r}] has too many elements" in str(e))
""",
        timeout=120,
    )
    assert out.splitlines() == ["15.0 [3, 4] 0.0", "refused True"] * 2, out
