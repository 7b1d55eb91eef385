// LoRA op family: op contracts and shape functions.
//
// Op names are namespaced (`TfLora>`) so they can never clash with an op core
// TensorFlow adds later.

#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/framework/types.h"

namespace tf_lora {
namespace {

using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

// Merges two dimensions that the op's contract says are equal; on a mismatch
// the error names the op, the contract and every input shape, not only the two
// numbers.
absl::Status MergeDims(InferenceContext* c, const char* op,
                       const char* contract, const char* what,
                       DimensionHandle d0, DimensionHandle d1,
                       DimensionHandle* out) {
  absl::Status s = c->Merge(d0, d1, out);
  if (s.ok()) return s;
  std::string shapes;
  for (int i = 0; i < c->num_inputs(); ++i) {
    shapes += (i ? ", " : "") + c->DebugString(c->input(i));
  }
  return absl::InvalidArgumentError(absl::StrCat(
      op, ": ", what, " differ (", c->DebugString(d0), " vs ",
      c->DebugString(d1), "); expected ", contract, ", got ", shapes));
}

absl::Status LoraMergeShape(InferenceContext* c) {
  static constexpr char kOp[] = "LoraMerge";
  static constexpr char kContract[] =
      "w [in, out], a [in, r], b [r, out], scale []";
  ShapeHandle w, a, b, scale;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &w));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &a));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 2, &b));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 0, &scale));
  DimensionHandle in, r, out;
  TF_RETURN_IF_ERROR(MergeDims(c, kOp, kContract, "in (w.shape[0], a.shape[0])",
                               c->Dim(w, 0), c->Dim(a, 0), &in));
  TF_RETURN_IF_ERROR(MergeDims(c, kOp, kContract, "r (a.shape[1], b.shape[0])",
                               c->Dim(a, 1), c->Dim(b, 0), &r));
  TF_RETURN_IF_ERROR(MergeDims(c, kOp, kContract,
                               "out (w.shape[1], b.shape[1])", c->Dim(w, 1),
                               c->Dim(b, 1), &out));
  c->set_output(0, c->Matrix(in, out));
  return absl::OkStatus();
}

// The dimensions of LoraApply and LoraApplyGrad: lead (y or grad) [N, out],
// x [N, in], a [in, r], b [r, out], scale [].
struct ApplyDims {
  DimensionHandle n, in, r, out;
};

absl::Status GetApplyDims(InferenceContext* c, const char* op,
                          const char* contract, const char* lead,
                          ApplyDims* dims) {
  ShapeHandle y, x, a, b, scale;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &y));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &x));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 2, &a));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 2, &b));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(4), 0, &scale));
  TF_RETURN_IF_ERROR(
      MergeDims(c, op, contract,
                absl::StrCat("N (", lead, ".shape[0], x.shape[0])").c_str(),
                c->Dim(y, 0), c->Dim(x, 0), &dims->n));
  TF_RETURN_IF_ERROR(MergeDims(c, op, contract, "in (x.shape[1], a.shape[0])",
                               c->Dim(x, 1), c->Dim(a, 0), &dims->in));
  TF_RETURN_IF_ERROR(MergeDims(c, op, contract, "r (a.shape[1], b.shape[0])",
                               c->Dim(a, 1), c->Dim(b, 0), &dims->r));
  TF_RETURN_IF_ERROR(
      MergeDims(c, op, contract,
                absl::StrCat("out (", lead, ".shape[1], b.shape[1])").c_str(),
                c->Dim(y, 1), c->Dim(b, 1), &dims->out));
  return absl::OkStatus();
}

absl::Status LoraApplyShape(InferenceContext* c) {
  ApplyDims dims;
  TF_RETURN_IF_ERROR(GetApplyDims(
      c, "LoraApply", "y [N, out], x [N, in], a [in, r], b [r, out], scale []",
      "y", &dims));
  c->set_output(0, c->Matrix(dims.n, dims.out));
  c->set_output(1, c->Matrix(dims.n, dims.r));
  return absl::OkStatus();
}

// The gradients' `saved` inputs: with saved = 1, xa and grad_xa (inputs
// first and first + 1) are [N, r], LoraApply's x @ a and its gradient.
absl::Status MergeSavedXa(InferenceContext* c, const char* op, int first,
                          const char* r_source, const char* contract,
                          DimensionHandle* n, DimensionHandle* r) {
  int64_t saved = 0;
  TF_RETURN_IF_ERROR(c->GetAttr("saved", &saved));
  if (saved > 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        op, ": saved is 0 or 1 (xa and grad_xa given or not), got ", saved));
  }
  if (saved == 0) return absl::OkStatus();
  for (const auto& [index, name] :
       {std::pair<int, const char*>{first, "xa"}, {first + 1, "grad_xa"}}) {
    ShapeHandle m;
    TF_RETURN_IF_ERROR(c->WithRank(c->input(index), 2, &m));
    TF_RETURN_IF_ERROR(
        MergeDims(c, op, contract,
                  absl::StrCat("N (x.shape[0], ", name, ".shape[0])").c_str(),
                  *n, c->Dim(m, 0), n));
    TF_RETURN_IF_ERROR(MergeDims(
        c, op, contract,
        absl::StrCat("r (", r_source, ", ", name, ".shape[1])").c_str(), *r,
        c->Dim(m, 1), r));
  }
  return absl::OkStatus();
}

absl::Status LoraApplyGradShape(InferenceContext* c) {
  ApplyDims dims;
  TF_RETURN_IF_ERROR(
      GetApplyDims(c, "LoraApplyGrad",
                   "grad [N, out], x [N, in], a [in, r], b [r, out], scale []",
                   "grad", &dims));
  TF_RETURN_IF_ERROR(
      MergeSavedXa(c, "LoraApplyGrad", /*first=*/5, "a.shape[1]",
                   "grad [N, out], x [N, in], a [in, r], b [r, out], scale [], "
                   "xa [N, r], grad_xa [N, r]",
                   &dims.n, &dims.r));
  c->set_output(0, c->Matrix(dims.n, dims.in));
  c->set_output(1, c->Matrix(dims.in, dims.r));
  c->set_output(2, c->Matrix(dims.r, dims.out));
  c->set_output(3, c->Scalar());
  return absl::OkStatus();
}

// The dimensions of BatchedLoraApply(Grad): lead [N, out], x [N, in],
// a_stack [n, in, r], b_stack [n, r, out], adapter_ids [N], scales [n].
struct BatchedDims {
  DimensionHandle n, in, r, out, adapters;
};

absl::Status GetBatchedDims(InferenceContext* c, const char* op,
                            const char* lead, BatchedDims* dims) {
  const std::string contract = absl::StrCat(
      lead,
      " [N, out], x [N, in], a_stack [n, in, r], b_stack [n, r, out], "
      "adapter_ids [N], scales [n]");
  const char* k = contract.c_str();
  ShapeHandle y, x, a, b, ids, scales;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &y));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &x));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 3, &a));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 3, &b));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(4), 1, &ids));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(5), 1, &scales));
  TF_RETURN_IF_ERROR(MergeDims(
      c, op, k, absl::StrCat("N (", lead, ".shape[0], x.shape[0])").c_str(),
      c->Dim(y, 0), c->Dim(x, 0), &dims->n));
  TF_RETURN_IF_ERROR(MergeDims(c, op, k, "N (x.shape[0], adapter_ids.shape[0])",
                               dims->n, c->Dim(ids, 0), &dims->n));
  TF_RETURN_IF_ERROR(MergeDims(c, op, k, "in (x.shape[1], a_stack.shape[1])",
                               c->Dim(x, 1), c->Dim(a, 1), &dims->in));
  TF_RETURN_IF_ERROR(MergeDims(c, op, k,
                               "r (a_stack.shape[2], b_stack.shape[1])",
                               c->Dim(a, 2), c->Dim(b, 1), &dims->r));
  TF_RETURN_IF_ERROR(MergeDims(
      c, op, k,
      absl::StrCat("out (", lead, ".shape[1], b_stack.shape[2])").c_str(),
      c->Dim(y, 1), c->Dim(b, 2), &dims->out));
  TF_RETURN_IF_ERROR(MergeDims(
      c, op, k, "the adapter count (a_stack.shape[0], b_stack.shape[0])",
      c->Dim(a, 0), c->Dim(b, 0), &dims->adapters));
  TF_RETURN_IF_ERROR(MergeDims(
      c, op, k, "the adapter count (a_stack.shape[0], scales.shape[0])",
      dims->adapters, c->Dim(scales, 0), &dims->adapters));
  return absl::OkStatus();
}

absl::Status BatchedLoraApplyShape(InferenceContext* c) {
  BatchedDims dims;
  TF_RETURN_IF_ERROR(GetBatchedDims(c, "BatchedLoraApply", "y", &dims));
  c->set_output(0, c->Matrix(dims.n, dims.out));
  c->set_output(1, c->Matrix(dims.n, dims.r));
  return absl::OkStatus();
}

absl::Status BatchedLoraApplyGradShape(InferenceContext* c) {
  BatchedDims dims;
  TF_RETURN_IF_ERROR(GetBatchedDims(c, "BatchedLoraApplyGrad", "grad", &dims));
  TF_RETURN_IF_ERROR(MergeSavedXa(
      c, "BatchedLoraApplyGrad", /*first=*/6, "a_stack.shape[2]",
      "grad [N, out], x [N, in], a_stack [n, in, r], b_stack [n, r, out], "
      "adapter_ids [N], scales [n], xa [N, r], grad_xa [N, r]",
      &dims.n, &dims.r));
  c->set_output(0, c->Matrix(dims.n, dims.in));
  c->set_output(1, c->MakeShape({dims.adapters, dims.in, dims.r}));
  c->set_output(2, c->MakeShape({dims.adapters, dims.r, dims.out}));
  c->set_output(3, c->Vector(dims.adapters));
  return absl::OkStatus();
}

absl::Status ResourceLoraMergeShape(InferenceContext* c) {
  static constexpr char kOp[] = "ResourceLoraMerge";
  static constexpr char kContract[] =
      "var [in, out], a [in, r], b [r, out], scale []";
  ShapeHandle a, b, scale;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &a));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 2, &b));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 0, &scale));
  DimensionHandle in, r, out;
  TF_RETURN_IF_ERROR(MergeDims(c, kOp, kContract, "r (a.shape[1], b.shape[0])",
                               c->Dim(a, 1), c->Dim(b, 0), &r));
  // The variable's shape and dtype, when the handle carries them.
  const auto* handle_data = c->input_handle_shapes_and_types(0);
  if (handle_data != nullptr && !handle_data->empty()) {
    const auto& var = handle_data->front();
    tensorflow::DataType dtype;
    TF_RETURN_IF_ERROR(c->GetAttr("T", &dtype));
    if (var.dtype != dtype) {
      return absl::InvalidArgumentError(
          absl::StrCat(kOp, ": the variable has dtype ",
                       tensorflow::DataTypeString(var.dtype),
                       " but a, b and scale have dtype ",
                       tensorflow::DataTypeString(dtype)));
    }
    ShapeHandle w;
    TF_RETURN_IF_ERROR(c->WithRank(var.shape, 2, &w));
    TF_RETURN_IF_ERROR(MergeDims(c, kOp, kContract,
                                 "in (var.shape[0], a.shape[0])", c->Dim(w, 0),
                                 c->Dim(a, 0), &in));
    TF_RETURN_IF_ERROR(MergeDims(c, kOp, kContract,
                                 "out (var.shape[1], b.shape[1])", c->Dim(w, 1),
                                 c->Dim(b, 1), &out));
  }
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP("TfLora>LoraMerge")
    .Input("w: T")
    .Input("a: T")
    .Input("b: T")
    .Input("scale: T")
    .Output("merged: T")
    .Attr("T: {float, double, half, bfloat16}")
    .SetShapeFn(LoraMergeShape)
    .Doc(R"doc(
Merges a LoRA adapter into a weight matrix: merged = w + scale * (a @ b).

One pass over w with no [in, out] temporary besides the output (which reuses w's buffer when TensorFlow
allows). half and bfloat16 accumulate in float32.

w: The base weight, [in, out].
a: The adapter's down projection, [in, r].
b: The adapter's up projection, [r, out].
scale: Scalar multiplier of the update, usually alpha / r.
merged: w + scale * (a @ b), [in, out].
)doc");

REGISTER_OP("TfLora>LoraApply")
    .Input("y: T")
    .Input("x: T")
    .Input("a: T")
    .Input("b: T")
    .Input("scale: T")
    .Output("y_out: T")
    .Output("xa: T")
    .Attr("T: {float, double, half, bfloat16}")
    .SetShapeFn(LoraApplyShape)
    .Doc(R"doc(
Applies a LoRA adapter to a layer's output: y_out = y + scale * (x @ a) @ b.

The op computes x @ a ([N, r], kept in float32 for half types), then makes one
pass that reads and writes y, with no [N, out] temporary (y's buffer is reused when TensorFlow
allows). With y = x @ w this is a LoRA layer: see tf_lora.lora_matmul. x @ a
is also an output, for the gradient (LoraApplyGrad with saved = 1), which then
need not compute it again.

y: The base layer's output, [N, out].
x: The layer's input, [N, in].
a: The adapter's down projection, [in, r].
b: The adapter's up projection, [r, out].
scale: Scalar multiplier of the update, usually alpha / r.
y_out: y + scale * (x @ a) @ b, [N, out].
xa: x @ a, [N, r] (rounded to T).
)doc");

REGISTER_OP("TfLora>ResourceLoraMerge")
    .Input("var: resource")
    .Input("a: T")
    .Input("b: T")
    .Input("scale: T")
    .Attr("T: {float, double, half, bfloat16}")
    .SetIsStateful()
    .SetShapeFn(ResourceLoraMergeShape)
    .Doc(R"doc(
Merges a LoRA adapter into a resource variable in place: var += scale * (a @ b).

This is how a server hot-swaps adapters without reallocating the base weight; a
negative scale unmerges. The update writes the variable's own buffer, unless a
read of the variable still shares it (then, as TensorFlow's ResourceApply* ops
do, the result goes to a new buffer in the same single pass). On any error the
variable is left as it was.

var: A resource variable holding the base weight, [in, out].
a: The adapter's down projection, [in, r].
b: The adapter's up projection, [r, out].
scale: Scalar multiplier of the update, usually alpha / r (negative to unmerge).
)doc");

REGISTER_OP("TfLora>LoraApplyGrad")
    .Input("grad: T")
    .Input("x: T")
    .Input("a: T")
    .Input("b: T")
    .Input("scale: T")
    .Input("xa: saved * T")
    .Input("grad_xa: saved * T")
    .Output("dx: T")
    .Output("da: T")
    .Output("db: T")
    .Output("dscale: T")
    .Attr("T: {float, double, half, bfloat16}")
    .Attr("saved: int >= 0 = 0")
    .SetShapeFn(LoraApplyGradShape)
    .Doc(R"doc(
The gradients of LoraApply for its upstream gradient (the gradient for y is
grad itself).

One pass over grad and x with only [N, r] intermediates: the rows of dx are
written as they are computed and da, db, dscale are accumulated per shard of
rows, shards that depend on N only, so results do not depend on the number of
threads. half and bfloat16 accumulate in float32.

With saved = 1 the op also takes LoraApply's second output xa (= x @ a) and
the gradient for it, grad_xa: float and double kernels use xa instead of
computing x @ a again (half types compute it again, in float32, which xa
rounded to T is not), and grad_xa joins scale * (grad @ b^T) in dx and da.
saved = 0 (graphs written before xa existed) is the same as grad_xa = 0.

grad: The gradient for LoraApply's output, [N, out].
x: The layer's input, [N, in].
a: The adapter's down projection, [in, r].
b: The adapter's up projection, [r, out].
scale: The scale LoraApply ran with.
xa: saved = 1: LoraApply's x @ a, [N, r].
grad_xa: saved = 1: the gradient for LoraApply's xa, [N, r].
saved: 1 when xa and grad_xa are given, else 0.
dx: (scale * (grad @ b^T) + grad_xa) @ a^T, [N, in].
da: x^T @ (scale * (grad @ b^T) + grad_xa), [in, r].
db: scale * (x @ a)^T @ grad, [r, out].
dscale: sum((x @ a) * (grad @ b^T)), [].
)doc");

REGISTER_OP("TfLora>BatchedLoraApply")
    .Input("y: T")
    .Input("x: T")
    .Input("a_stack: T")
    .Input("b_stack: T")
    .Input("adapter_ids: int32")
    .Input("scales: T")
    .Output("y_out: T")
    .Output("xa: T")
    .Attr("T: {float, double, half, bfloat16}")
    .SetShapeFn(BatchedLoraApplyShape)
    .Doc(R"doc(
Applies one of several LoRA adapters to each row, for multi-adapter serving:
y_out[i] = y[i] + scales[k] * (x[i] @ a_stack[k]) @ b_stack[k], k = adapter_ids[i];
id -1 passes the row through.

Rows may come in any order: the kernel groups them by adapter and runs the
fused LoraApply over each group in place, with no [N, out] temporary and no
per-row copy of the adapters. An id outside [-1, n) is an error naming the
first such row. Each row's x @ a (zero for id -1) is also an output, for the
gradient (BatchedLoraApplyGrad with saved = 1).

y: The base layer's output, [N, out].
x: The layer's input, [N, in].
a_stack: The adapters' down projections, [n, in, r].
b_stack: The adapters' up projections, [n, r, out].
adapter_ids: Each row's adapter, [N], in [-1, n).
scales: Each adapter's scale, [n].
y_out: [N, out].
xa: x[i] @ a_stack[adapter_ids[i]] (zero for id -1), [N, r] (rounded to T).
)doc");

REGISTER_OP("TfLora>BatchedLoraApplyGrad")
    .Input("grad: T")
    .Input("x: T")
    .Input("a_stack: T")
    .Input("b_stack: T")
    .Input("adapter_ids: int32")
    .Input("scales: T")
    .Input("xa: saved * T")
    .Input("grad_xa: saved * T")
    .Output("dx: T")
    .Output("da_stack: T")
    .Output("db_stack: T")
    .Output("dscales: T")
    .Attr("T: {float, double, half, bfloat16}")
    .Attr("saved: int >= 0 = 0")
    .SetShapeFn(BatchedLoraApplyGradShape)
    .Doc(R"doc(
The gradients of BatchedLoraApply: LoraApplyGrad over each adapter's rows.

Rows with id -1 get dx = 0; adapters no row uses get zero gradients. With
saved = 1, BatchedLoraApply's xa and the gradient for it, as in LoraApplyGrad
(a row's grad_xa joins scales[k] * (grad @ b_k^T) for its dx and da_k; rows
with id -1 take none).

grad: The gradient for BatchedLoraApply's output, [N, out].
x: The layer's input, [N, in].
a_stack: [n, in, r].
b_stack: [n, r, out].
adapter_ids: [N], in [-1, n).
scales: [n].
xa: saved = 1: BatchedLoraApply's xa, [N, r].
grad_xa: saved = 1: the gradient for it, [N, r].
saved: 1 when xa and grad_xa are given, else 0.
dx: [N, in].
da_stack: [n, in, r].
db_stack: [n, r, out].
dscales: [n].
)doc");

}  // namespace tf_lora
