// Sparse embedding table op family: op contracts and shape functions.

#include "core/kernels/sparse_table.h"
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace tf_lora {
namespace {

using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

// The dim attr within the bound a table takes, checked when the graph is
// built (the kernels check it again).
absl::Status GetDim(InferenceContext* c, const char* op, int64_t* dim) {
  TF_RETURN_IF_ERROR(c->GetAttr("dim", dim));
  const std::string error = sparse::Config::CheckDim(*dim);
  if (!error.empty())
    return absl::InvalidArgumentError(absl::StrCat(op, ": ", error));
  return absl::OkStatus();
}

absl::Status TableShape(InferenceContext* c) {
  int64_t dim;
  TF_RETURN_IF_ERROR(GetDim(c, "SparseTable", &dim));
  c->set_output(0, c->Scalar());
  return absl::OkStatus();
}

// values: ids.shape + [dim].
absl::Status PullShape(InferenceContext* c) {
  int64_t dim;
  TF_RETURN_IF_ERROR(GetDim(c, "SparseTablePull", &dim));
  ShapeHandle out;
  TF_RETURN_IF_ERROR(c->Concatenate(c->input(1), c->Vector(dim), &out));
  c->set_output(0, out);
  return absl::OkStatus();
}

absl::Status PushShape(InferenceContext* c) {
  ShapeHandle unused;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 0, &unused));  // learning_rate
  ShapeHandle ids = c->input(1), grads = c->input(2);
  if (c->RankKnown(ids) && c->RankKnown(grads)) {
    ShapeHandle grads_ids;
    TF_RETURN_IF_ERROR(c->WithRank(grads, c->Rank(ids) + 1, &grads));
    TF_RETURN_IF_ERROR(c->Subshape(grads, 0, -1, &grads_ids));
    absl::Status s = c->Merge(ids, grads_ids, &unused);
    if (!s.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "SparseTablePush: grads must have shape ids.shape + [dim]; got ids ",
          c->DebugString(ids), " and grads ", c->DebugString(grads)));
    }
  }
  c->set_output(0, c->Scalar());
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP("TfLora>SparseTable")
    .Output("table: resource")
    .Attr("container: string = ''")
    .Attr("shared_name: string = ''")
    .Attr("dim: int >= 1")
    .Attr("initializer: {'zeros', 'uniform', 'normal', 'truncated_normal'}")
    .Attr("init_a: float = 0")
    .Attr("init_b: float = 0")
    .Attr("seed: int = 0")
    .Attr("optimizer: {'sgd', 'adagrad', 'adam', 'ftrl'}")
    .Attr("initial_accumulator: float = 0.1")
    .Attr("epsilon: float = 1e-7")
    .Attr("beta_1: float = 0.9")
    .Attr("beta_2: float = 0.999")
    .Attr("one_minus_beta_1: float = -1")
    .Attr("one_minus_beta_2: float = -1")
    .Attr("l1: float = 0")
    .Attr("l2: float = 0")
    .Attr("lr_power: float = -0.5")
    .SetIsStateful()
    .SetShapeFn(TableShape)
    .Doc(R"doc(
A sparse embedding table: int64 keys to float32 rows of `dim` (at most 2^20),
growing as keys arrive, with optimizer slots and per-key metadata.

A new key's row comes from the initializer as a pure function of (seed, key):
uniform in [init_a, init_b), or (truncated) normal with mean init_a and stddev
init_b. The optimizer (sgd, adagrad, adam or ftrl, computed as Keras 3 does,
with its hyper-parameters as attrs) is applied by SparseTablePush.
one_minus_beta_1/2 (default: computed from beta_1/2) let a caller pass 1 - beta
rounded from double precision, as Keras computes it. Tables with the same container and shared_name are
one table, and must agree on dim and optimizer.
)doc");

REGISTER_OP("TfLora>SparseTablePull")
    .Input("table: resource")
    .Input("ids: int64")
    .Output("values: float")
    .Attr("dim: int >= 1")
    .Attr("training: bool = false")
    .SetIsStateful()
    .SetShapeFn(PullShape)
    .Doc(R"doc(
Reads the rows of ids: values has shape ids.shape + [dim].

With training, ids not in the table are inserted with their initial rows;
without, they read as zeros and nothing is inserted.
)doc");

REGISTER_OP("TfLora>SparseTablePush")
    .Input("table: resource")
    .Input("ids: int64")
    .Input("grads: float")
    .Input("learning_rate: float")
    .Output("step: int64")
    .SetIsStateful()
    .SetShapeFn(PushShape)
    .Doc(R"doc(
Applies the table's optimizer to the rows of ids with gradients grads
(ids.shape + [dim]). Gradients of duplicate ids are summed first; each unique id
is updated once, its update count incremented and its last step set to the
table's step, which each push advances. Returns that step.
)doc");

REGISTER_OP("TfLora>SparseTableSize")
    .Input("table: resource")
    .Output("size: int64")
    .SetIsStateful()
    .SetShapeFn(tensorflow::shape_inference::ScalarShape)
    .Doc("The number of keys in the table.");

REGISTER_OP("TfLora>SparseTableExport")
    .Input("table: resource")
    .Output("keys: int64")
    .Output("values: float")
    .Output("slots: float")
    .Output("update_counts: int64")
    .Output("last_steps: int64")
    .Output("step: int64")
    .SetIsStateful()
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->Vector(c->UnknownDim()));
      c->set_output(1, c->Matrix(c->UnknownDim(), c->UnknownDim()));
      c->set_output(2, c->Matrix(c->UnknownDim(), c->UnknownDim()));
      c->set_output(3, c->Vector(c->UnknownDim()));
      c->set_output(4, c->Vector(c->UnknownDim()));
      c->set_output(5, c->Scalar());
      return absl::OkStatus();
    })
    .Doc(R"doc(
Every key of the table with its values [n, dim], optimizer slots
[n, dim * slots], update counts and last steps, and the table's step.
)doc");

REGISTER_OP("TfLora>SparseTableImport")
    .Input("table: resource")
    .Input("keys: int64")
    .Input("values: float")
    .Input("slots: float")
    .Input("update_counts: int64")
    .Input("last_steps: int64")
    .Input("step: int64")
    .SetIsStateful()
    .SetShapeFn(tensorflow::shape_inference::NoOutputs)
    .Doc(R"doc(
Replaces the table's contents with what SparseTableExport gave. Mismatched
lengths or dims, and duplicate keys, are errors that leave the table as it was.
)doc");

REGISTER_OP("TfLora>SparseTableRemove")
    .Input("table: resource")
    .Input("ids: int64")
    .Output("removed: int64")
    .SetIsStateful()
    .SetShapeFn(tensorflow::shape_inference::ScalarShape)
    .Doc(R"doc(
Removes ids from the table (ids not in it are ignored); returns how many went.
)doc");

REGISTER_OP("TfLora>SparseTableEvict")
    .Input("table: resource")
    .Input("min_update_count: int64")
    .Input("max_age: int64")
    .Output("evicted: int64")
    .SetIsStateful()
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle unused;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 0, &unused));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 0, &unused));
      c->set_output(0, c->Scalar());
      return absl::OkStatus();
    })
    .Doc(R"doc(
Removes every key updated fewer than min_update_count times, and (when max_age
>= 0) every key last updated more than max_age pushes ago; returns how many.
)doc");

}  // namespace tf_lora
