// Input checks of the LoRA ops, shared by the CPU and GPU kernel glue
// (lora_kernels.cc, lora_kernels_gpu.cc): the same contracts and messages on
// every device.

#ifndef TF_LORA_CORE_KERNELS_LORA_CHECKS_H_
#define TF_LORA_CORE_KERNELS_LORA_CHECKS_H_

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/kernels/resource_handle.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_mgr.h"
#include "tensorflow/core/framework/resource_var.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/util/overflow.h"

namespace tf_lora {
namespace lora_checks {

using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::TensorShapeUtils;

using Named = std::pair<const char*, const TensorShape*>;

// "; got y [4,8], x [4,3], ..." for error messages.
inline std::string Received(std::initializer_list<Named> shapes) {
  std::string out = "; got";
  const char* sep = " ";
  for (const auto& [name, shape] : shapes) {
    absl::StrAppend(&out, sep, name, " ", shape->DebugString());
    sep = ", ";
  }
  return out;
}

// LoraMerge and ResourceLoraMerge: w [in, out], a [in, r], b [r, out], [].
inline absl::Status CheckMergeInputs(const char* op, const char* w_name,
                                     const TensorShape& w, const Tensor& a,
                                     const Tensor& b, const Tensor& scale) {
  const auto got = [&] {
    return Received({{w_name, &w},
                     {"a", &a.shape()},
                     {"b", &b.shape()},
                     {"scale", &scale.shape()}});
  };
  if (!TensorShapeUtils::IsMatrix(w) ||
      !TensorShapeUtils::IsMatrix(a.shape()) ||
      !TensorShapeUtils::IsMatrix(b.shape()) ||
      !TensorShapeUtils::IsScalar(scale.shape())) {
    return absl::InvalidArgumentError(absl::StrCat(
        op, ": expected ", w_name,
        " [in, out], a [in, r], b [r, out] and a scalar scale", got()));
  }
  if (a.dim_size(0) != w.dim_size(0) || b.dim_size(0) != a.dim_size(1) ||
      b.dim_size(1) != w.dim_size(1)) {
    return absl::InvalidArgumentError(absl::StrCat(
        op, ": expected a [", w.dim_size(0), ", r] and b [r, ", w.dim_size(1),
        "] to match ", w_name, " [in, out] and each other", got()));
  }
  return absl::OkStatus();
}

// LoraApply and LoraApplyGrad: lead (y or grad) [N, out], x [N, in],
// a [in, r], b [r, out], scale [].
inline absl::Status CheckApplyInputs(const char* op, const char* lead_name,
                                     const Tensor& lead, const Tensor& x,
                                     const Tensor& a, const Tensor& b,
                                     const Tensor& scale) {
  const auto got = [&] {
    return Received({{lead_name, &lead.shape()},
                     {"x", &x.shape()},
                     {"a", &a.shape()},
                     {"b", &b.shape()},
                     {"scale", &scale.shape()}});
  };
  if (!TensorShapeUtils::IsMatrix(lead.shape()) ||
      !TensorShapeUtils::IsMatrix(x.shape()) ||
      !TensorShapeUtils::IsMatrix(a.shape()) ||
      !TensorShapeUtils::IsMatrix(b.shape()) ||
      !TensorShapeUtils::IsScalar(scale.shape())) {
    return absl::InvalidArgumentError(absl::StrCat(
        op, ": expected ", lead_name,
        " [N, out], x [N, in], a [in, r], b [r, out] and a scalar scale",
        got()));
  }
  const int64_t n = lead.dim_size(0), out = lead.dim_size(1);
  if (x.dim_size(0) != n || a.dim_size(0) != x.dim_size(1) ||
      b.dim_size(0) != a.dim_size(1) || b.dim_size(1) != out) {
    return absl::InvalidArgumentError(absl::StrCat(
        op, ": expected x [", n, ", in], a [in, r] and b [r, ", out,
        "] to match ", lead_name, " [N, out] and each other", got()));
  }
  return absl::OkStatus();
}

// BatchedLoraApply(Grad): lead [N, out], x [N, in], a_stack [n, in, r],
// b_stack [n, r, out], adapter_ids [N] in [-1, n), scales [n].
// `ids_on_host`: the ids are read here too (on a GPU they are checked by the
// kernel: lora_kernels_gpu.cc).
inline absl::Status CheckBatchedInputs(const char* op, const char* lead_name,
                                       const Tensor& lead, const Tensor& x,
                                       const Tensor& a_stack,
                                       const Tensor& b_stack, const Tensor& ids,
                                       const Tensor& scales,
                                       bool ids_on_host = true) {
  const auto got = [&] {
    return Received({{lead_name, &lead.shape()},
                     {"x", &x.shape()},
                     {"a_stack", &a_stack.shape()},
                     {"b_stack", &b_stack.shape()},
                     {"adapter_ids", &ids.shape()},
                     {"scales", &scales.shape()}});
  };
  if (!TensorShapeUtils::IsMatrix(lead.shape()) ||
      !TensorShapeUtils::IsMatrix(x.shape()) || a_stack.dims() != 3 ||
      b_stack.dims() != 3 || !TensorShapeUtils::IsVector(ids.shape()) ||
      !TensorShapeUtils::IsVector(scales.shape())) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": expected ", lead_name,
                     " [N, out], x [N, in], a_stack [n, in, r], b_stack "
                     "[n, r, out], adapter_ids [N] and scales [n]",
                     got()));
  }
  const int64_t n = lead.dim_size(0), out = lead.dim_size(1);
  const int64_t adapters = a_stack.dim_size(0);
  if (b_stack.dim_size(0) != adapters || scales.dim_size(0) != adapters) {
    return absl::InvalidArgumentError(absl::StrCat(
        op,
        ": a_stack, b_stack and scales must hold the same number of "
        "adapters, got ",
        adapters, ", ", b_stack.dim_size(0), " and ", scales.dim_size(0),
        got()));
  }
  if (x.dim_size(0) != n || ids.dim_size(0) != n ||
      a_stack.dim_size(1) != x.dim_size(1) ||
      b_stack.dim_size(1) != a_stack.dim_size(2) ||
      b_stack.dim_size(2) != out) {
    return absl::InvalidArgumentError(absl::StrCat(
        op, ": expected x [", n, ", in], adapter_ids [", n,
        "], a_stack [n, in, r] and b_stack [n, r, ", out, "] to match ",
        lead_name, " [N, out] and each other", got()));
  }
  if (!ids_on_host) return absl::OkStatus();
  const auto id = ids.flat<int32_t>();
  for (int64_t i = 0; i < n; ++i) {
    if (id(i) < -1 || id(i) >= adapters) {
      return absl::InvalidArgumentError(absl::StrCat(
          op, ": adapter_ids[", i, "] = ", id(i), " is out of range [-1, ",
          adapters, ") (", adapters, " adapters; -1 means no adapter)"));
    }
  }
  return absl::OkStatus();
}

// A LoRA scale (or each adapter's, for the batched ops) must be finite: a NaN
// or an infinity would turn every output it touches into NaN or Inf, silent
// garbage that no caller means.
template <typename T>
inline absl::Status CheckFiniteScales(const char* op, const char* name,
                                      const Tensor& scales) {
  const auto flat = scales.flat<T>();
  for (int64_t i = 0; i < flat.size(); ++i) {
    const float value = static_cast<float>(flat(i));
    if (!std::isfinite(value)) {
      return absl::InvalidArgumentError(
          scales.dims() == 0
              ? absl::StrCat(op, ": ", name, " must be finite; got ", value)
              : absl::StrCat(op, ": ", name, " must be finite; got ", name, "[",
                             i, "] = ", value));
    }
  }
  return absl::OkStatus();
}

// The functors size their scratch from products of the dimensions (x @ a is
// [N, r], packed operands and the gradient's per-shard partials about
// 16 * r * in and 16 * r * out, each rounded up to whole tiles). With every
// dimension at least 1 each operand holds real data, so these products are
// bounded by memory in any sane call; they are still checked, with margin,
// before anything runs. Work with an empty dimension is not checked: the
// functors return at once (or fill zeros) without scratch, and such inputs
// are valid whatever the other dimensions (a [0, 2^62] is an empty tensor).
inline absl::Status CheckWorkSizes(const char* op, int64_t n, int64_t in,
                                   int64_t out, int64_t r) {
  if (n == 0 || in == 0 || out == 0 || r == 0) return absl::OkStatus();
  constexpr int64_t kPad = 64, kScratchFactor = 16 * 8;  // tiles, bytes
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max() - kPad;
  const auto fits = [](int64_t rows, int64_t cols) {
    if (rows > kMax || cols > kMax) return false;
    const int64_t elements =
        tensorflow::MultiplyWithoutOverflow(rows + kPad, cols + kPad);
    return elements >= 0 &&
           tensorflow::MultiplyWithoutOverflow(elements, kScratchFactor) >= 0;
  };
  if (fits(n, r) && fits(r, in) && fits(r, out)) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      op, ": N = ", n, ", in = ", in, ", out = ", out, " and r = ", r,
      " need scratch buffers whose sizes overflow 64-bit integers"));
}

// -- each op's inputs, read from the context and checked ---------------------

// LoraMerge: w [in, out], a [in, r], b [r, out], scale.
struct MergeInputs {
  const Tensor* w;
  const Tensor* a;
  const Tensor* b;
  const Tensor* scale;
  int64_t in() const { return w->dim_size(0); }
  int64_t out() const { return w->dim_size(1); }
  int64_t r() const { return a->dim_size(1); }
};

template <typename T>
absl::Status ReadMergeInputs(::tensorflow::OpKernelContext* ctx,
                             MergeInputs* in) {
  *in = {&ctx->input(0), &ctx->input(1), &ctx->input(2), &ctx->input(3)};
  absl::Status s = CheckMergeInputs("LoraMerge", "w", in->w->shape(), *in->a,
                                    *in->b, *in->scale);
  if (s.ok()) s = CheckFiniteScales<T>("LoraMerge", "scale", *in->scale);
  if (s.ok()) s = CheckWorkSizes("LoraMerge", in->in(), 1, in->out(), in->r());
  return s;
}

// LoraApply and LoraApplyGrad: lead (y or grad) [N, out], x [N, in],
// a [in, r], b [r, out], scale.
struct ApplyInputs {
  const Tensor* lead;
  const Tensor* x;
  const Tensor* a;
  const Tensor* b;
  const Tensor* scale;
  // LoraApplyGrad with saved = 1: LoraApply's x @ a and the gradient for it,
  // each [N, r]; null otherwise.
  const Tensor* xa = nullptr;
  const Tensor* grad_xa = nullptr;
  int64_t n() const { return lead->dim_size(0); }
  int64_t in() const { return x->dim_size(1); }
  int64_t out() const { return lead->dim_size(1); }
  int64_t r() const { return a->dim_size(1); }
};

template <typename T>
absl::Status ReadApplyInputs(::tensorflow::OpKernelContext* ctx, const char* op,
                             const char* lead_name, ApplyInputs* in) {
  *in = {&ctx->input(0), &ctx->input(1), &ctx->input(2), &ctx->input(3),
         &ctx->input(4)};
  absl::Status s = CheckApplyInputs(op, lead_name, *in->lead, *in->x, *in->a,
                                    *in->b, *in->scale);
  if (s.ok()) s = CheckFiniteScales<T>(op, "scale", *in->scale);
  if (s.ok()) s = CheckWorkSizes(op, in->n(), in->in(), in->out(), in->r());
  return s;
}

// (Batched)LoraApply's second output, x @ a: [N, r], which may not fit in a
// tensor shape even where the inputs are empty (x [2^61, 0], a [0, 2^31]).
inline absl::Status XaShape(const char* op, const char* a_name, const Tensor& x,
                            const Tensor& a, TensorShape* shape) {
  const int64_t n = x.dim_size(0), r = a.dim_size(a.dims() - 1);
  const absl::Status s = TensorShape::BuildTensorShape({n, r}, shape);
  if (s.ok()) return s;
  return absl::InvalidArgumentError(
      absl::StrCat(op, ": its x @ a output [N, r] = [", n, ", ", r,
                   "] has too many elements for a tensor",
                   Received({{"x", &x.shape()}, {a_name, &a.shape()}})));
}

// The gradients' saved inputs (saved = 1: inputs `first` and `first` + 1),
// each [N, r]; null when not given.
inline absl::Status ReadSavedXa(::tensorflow::OpKernelContext* ctx,
                                const char* op, int first, const Tensor& lead,
                                const Tensor& a, const Tensor** xa,
                                const Tensor** grad_xa) {
  *xa = *grad_xa = nullptr;
  if (ctx->num_inputs() == first) return absl::OkStatus();
  *xa = &ctx->input(first);
  *grad_xa = &ctx->input(first + 1);
  const TensorShape expected({lead.dim_size(0), a.dim_size(a.dims() - 1)});
  if ((*xa)->shape() == expected && (*grad_xa)->shape() == expected) {
    return absl::OkStatus();
  }
  const bool stacked = a.dims() == 3;
  return absl::InvalidArgumentError(absl::StrCat(
      op, ": expected xa and grad_xa [N, r] = ", expected.DebugString(),
      stacked ? " (grad [N, out], a_stack [n, in, r])"
              : " (grad [N, out], a [in, r])",
      Received({{"grad", &lead.shape()},
                {stacked ? "a_stack" : "a", &a.shape()},
                {"xa", &(*xa)->shape()},
                {"grad_xa", &(*grad_xa)->shape()}})));
}

// LoraApplyGrad: ReadApplyInputs, then xa and grad_xa when given (saved = 1:
// inputs 5 and 6), each [N, r].
template <typename T>
absl::Status ReadApplyGradInputs(::tensorflow::OpKernelContext* ctx,
                                 ApplyInputs* in) {
  absl::Status s = ReadApplyInputs<T>(ctx, "LoraApplyGrad", "grad", in);
  if (!s.ok()) return s;
  return ReadSavedXa(ctx, "LoraApplyGrad", 5, *in->lead, *in->a, &in->xa,
                     &in->grad_xa);
}

// BatchedLoraApply(Grad): lead [N, out], x [N, in], a_stack [n, in, r],
// b_stack [n, r, out], adapter_ids [N], scales [n].
struct BatchedInputs {
  const Tensor* lead;
  const Tensor* x;
  const Tensor* a_stack;
  const Tensor* b_stack;
  const Tensor* ids;
  const Tensor* scales;
  // BatchedLoraApplyGrad with saved = 1 (see ApplyInputs).
  const Tensor* xa = nullptr;
  const Tensor* grad_xa = nullptr;
  int64_t n() const { return lead->dim_size(0); }
  int64_t in() const { return x->dim_size(1); }
  int64_t out() const { return lead->dim_size(1); }
  int64_t r() const { return a_stack->dim_size(2); }
  int64_t adapters() const { return a_stack->dim_size(0); }
};

template <typename T>
absl::Status ReadBatchedInputs(::tensorflow::OpKernelContext* ctx,
                               const char* op, const char* lead_name,
                               bool ids_on_host, BatchedInputs* in) {
  *in = {&ctx->input(0), &ctx->input(1), &ctx->input(2),
         &ctx->input(3), &ctx->input(4), &ctx->input(5)};
  absl::Status s =
      CheckBatchedInputs(op, lead_name, *in->lead, *in->x, *in->a_stack,
                         *in->b_stack, *in->ids, *in->scales, ids_on_host);
  if (s.ok()) s = CheckFiniteScales<T>(op, "scales", *in->scales);
  if (s.ok()) s = CheckWorkSizes(op, in->n(), in->in(), in->out(), in->r());
  return s;
}

template <typename T>
absl::Status ReadBatchedGradInputs(::tensorflow::OpKernelContext* ctx,
                                   bool ids_on_host, BatchedInputs* in) {
  absl::Status s = ReadBatchedInputs<T>(ctx, "BatchedLoraApplyGrad", "grad",
                                        ids_on_host, in);
  if (!s.ok()) return s;
  return ReadSavedXa(ctx, "BatchedLoraApplyGrad", 6, *in->lead, *in->a_stack,
                     &in->xa, &in->grad_xa);
}

// ResourceLoraMerge's variable (input 0): the handle checked and looked up.
inline absl::Status LookupMergeVariable(
    ::tensorflow::OpKernelContext* ctx,
    ::tensorflow::core::RefCountPtr<::tensorflow::Var>* var) {
  absl::Status s = CheckScalarHandle(ctx, "ResourceLoraMerge", "var");
  if (!s.ok()) return s;
  const absl::Status lookup = ::tensorflow::LookupResource(
      ctx, ::tensorflow::HandleFromInput(ctx, 0), var);
  if (lookup.ok()) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      "ResourceLoraMerge: var must be the handle of a resource variable: ",
      lookup.message()));
}

// With the variable's lock held: its value, a, b and scale (inputs 1-3).
template <typename T>
absl::Status CheckMergeVariable(::tensorflow::OpKernelContext* ctx,
                                ::tensorflow::Var* var) {
  if (!var->is_initialized) {
    return absl::FailedPreconditionError(
        "ResourceLoraMerge: the variable is not initialized");
  }
  const Tensor& w = *var->tensor();
  const ::tensorflow::DataType want = ::tensorflow::DataTypeToEnum<T>::v();
  if (w.dtype() != want) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ResourceLoraMerge: the variable has dtype ",
        ::tensorflow::DataTypeString(w.dtype()),
        " but a, b and scale have dtype ", ::tensorflow::DataTypeString(want)));
  }
  const Tensor& a = ctx->input(1);
  absl::Status s = CheckMergeInputs("ResourceLoraMerge", "var", w.shape(), a,
                                    ctx->input(2), ctx->input(3));
  if (s.ok())
    s = CheckFiniteScales<T>("ResourceLoraMerge", "scale", ctx->input(3));
  if (s.ok()) {
    s = CheckWorkSizes("ResourceLoraMerge", w.dim_size(0), 1, w.dim_size(1),
                       a.dim_size(1));
  }
  return s;
}

// Where ResourceLoraMerge writes, as TensorFlow's ResourceApply* ops do: the
// variable's own buffer, or, while a read still shares it (or the variable
// copies on read), `fresh`, a new buffer written in the same single pass and
// swapped in after (`*target == fresh`).
inline absl::Status MergeTarget(::tensorflow::OpKernelContext* ctx,
                                ::tensorflow::Var* var, Tensor* fresh,
                                Tensor** target) {
  Tensor* w = var->tensor();
  *target = w;
  if (!var->copy_on_read_mode.load() && w->RefCountIsOne()) {
    return absl::OkStatus();
  }
  *target = fresh;
  return ctx->allocate_temp(w->dtype(), w->shape(), fresh);
}

}  // namespace lora_checks
}  // namespace tf_lora

#endif  // TF_LORA_CORE_KERNELS_LORA_CHECKS_H_
