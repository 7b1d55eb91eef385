// LoRA op family: OpKernel glue. Checks inputs, allocates outputs, calls the
// functors of lora.h.

#define EIGEN_USE_THREADS

#include <cmath>
#include <initializer_list>
#include <limits>
#include <string>
#include <utility>

#include "core/kernels/exceptions_to_status.h"
#include "core/kernels/huge_pages.h"
#include "core/kernels/lora.h"
#include "core/kernels/resource_handle.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_mgr.h"
#include "tensorflow/core/framework/resource_var.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/util/overflow.h"

namespace tf_lora {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::TensorShapeUtils;
using CPUDevice = Eigen::ThreadPoolDevice;

namespace {

using Named = std::pair<const char*, const TensorShape*>;

// "; got y [4,8], x [4,3], ..." for error messages.
std::string Received(std::initializer_list<Named> shapes) {
  std::string out = "; got";
  const char* sep = " ";
  for (const auto& [name, shape] : shapes) {
    absl::StrAppend(&out, sep, name, " ", shape->DebugString());
    sep = ", ";
  }
  return out;
}

// LoraMerge and ResourceLoraMerge: w [in, out], a [in, r], b [r, out], [].
absl::Status CheckMergeInputs(const char* op, const char* w_name,
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
absl::Status CheckApplyInputs(const char* op, const char* lead_name,
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
absl::Status CheckBatchedInputs(const char* op, const char* lead_name,
                                const Tensor& lead, const Tensor& x,
                                const Tensor& a_stack, const Tensor& b_stack,
                                const Tensor& ids, const Tensor& scales) {
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
absl::Status CheckFiniteScales(const char* op, const char* name,
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
absl::Status CheckWorkSizes(const char* op, int64_t n, int64_t in, int64_t out,
                            int64_t r) {
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

// ExceptionsToStatus's `what` for the functors. They take their scratch
// buffers (packed operands, x @ a, gradient partials: the allocations that
// grow with the inputs) on the calling thread before writing any output, so
// running short leaves an in-place variable (ResourceLoraMerge) unwritten;
// other outputs go with the error.
constexpr char kScratch[] = "for the kernel's scratch buffers";

// Outputs of this size and more go on huge pages (AdviseFreshOutput).
constexpr size_t kHugeOutputBytes = 8 << 20;

// Advises a large output onto huge pages before the kernel first touches it,
// unless it is a forwarded input (`input`), already in use. TensorFlow's
// default CPU allocator maps large tensors afresh, and faulting them in 4 KiB
// at a time can cost more than the kernels themselves (benchmarks/RESULTS.md,
// "Huge pages for fresh large outputs"); with the BFC allocator, whose memory
// is already faulted in, the advice only marks the range.
// TF_LORA_HUGE_PAGES=0 turns it off.
void AdviseFreshOutput(const Tensor* output, const Tensor* input = nullptr) {
  const auto data = output->tensor_data();
  if (data.size() < kHugeOutputBytes) return;
  if (input != nullptr && input->tensor_data().data() == data.data()) return;
  AdviseHugePages(data.data(), data.size());
}

}  // namespace

template <typename Device, typename T>
class LoraMergeOp : public OpKernel {
 public:
  explicit LoraMergeOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& w = ctx->input(0);
    const Tensor& a = ctx->input(1);
    const Tensor& b = ctx->input(2);
    const Tensor& scale = ctx->input(3);
    OP_REQUIRES_OK(ctx,
                   CheckMergeInputs("LoraMerge", "w", w.shape(), a, b, scale));
    OP_REQUIRES_OK(ctx, CheckFiniteScales<T>("LoraMerge", "scale", scale));
    OP_REQUIRES_OK(ctx, CheckWorkSizes("LoraMerge", w.dim_size(0), 1,
                                       w.dim_size(1), a.dim_size(1)));
    Tensor* merged = nullptr;
    OP_REQUIRES_OK(
        ctx, ctx->forward_input_or_allocate_output({0}, 0, w.shape(), &merged));
    AdviseFreshOutput(merged, &w);
    OP_REQUIRES_OK(ctx, ExceptionsToStatus("LoraMerge", kScratch, [&] {
                     functor::LoraMerge<Device, T>()(
                         ctx->eigen_device<Device>(), w.dim_size(0),
                         w.dim_size(1), a.dim_size(1), w.flat<T>().data(),
                         a.flat<T>().data(), b.flat<T>().data(),
                         scale.scalar<T>()(), merged->flat<T>().data());
                   }));
  }
};

template <typename Device, typename T>
class LoraApplyOp : public OpKernel {
 public:
  explicit LoraApplyOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& y = ctx->input(0);
    const Tensor& x = ctx->input(1);
    const Tensor& a = ctx->input(2);
    const Tensor& b = ctx->input(3);
    const Tensor& scale = ctx->input(4);
    OP_REQUIRES_OK(ctx, CheckApplyInputs("LoraApply", "y", y, x, a, b, scale));
    OP_REQUIRES_OK(ctx, CheckFiniteScales<T>("LoraApply", "scale", scale));
    OP_REQUIRES_OK(ctx,
                   CheckWorkSizes("LoraApply", y.dim_size(0), x.dim_size(1),
                                  y.dim_size(1), a.dim_size(1)));
    Tensor* y_out = nullptr;
    OP_REQUIRES_OK(
        ctx, ctx->forward_input_or_allocate_output({0}, 0, y.shape(), &y_out));
    AdviseFreshOutput(y_out, &y);
    OP_REQUIRES_OK(ctx, ExceptionsToStatus("LoraApply", kScratch, [&] {
                     functor::LoraApply<Device, T>()(
                         ctx->eigen_device<Device>(), y.dim_size(0),
                         x.dim_size(1), y.dim_size(1), a.dim_size(1),
                         y.flat<T>().data(), x.flat<T>().data(),
                         a.flat<T>().data(), b.flat<T>().data(),
                         scale.scalar<T>()(), y_out->flat<T>().data());
                   }));
  }
};

template <typename Device, typename T>
class LoraApplyGradOp : public OpKernel {
 public:
  explicit LoraApplyGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& g = ctx->input(0);
    const Tensor& x = ctx->input(1);
    const Tensor& a = ctx->input(2);
    const Tensor& b = ctx->input(3);
    const Tensor& scale = ctx->input(4);
    OP_REQUIRES_OK(
        ctx, CheckApplyInputs("LoraApplyGrad", "grad", g, x, a, b, scale));
    OP_REQUIRES_OK(ctx, CheckFiniteScales<T>("LoraApplyGrad", "scale", scale));
    OP_REQUIRES_OK(ctx,
                   CheckWorkSizes("LoraApplyGrad", g.dim_size(0), x.dim_size(1),
                                  g.dim_size(1), a.dim_size(1)));
    Tensor *dx, *da, *db, *dscale;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &dx));
    AdviseFreshOutput(dx);
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, a.shape(), &da));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, b.shape(), &db));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, scale.shape(), &dscale));
    OP_REQUIRES_OK(
        ctx, ExceptionsToStatus("LoraApplyGrad", kScratch, [&] {
          functor::LoraApplyGrad<Device, T>()(
              ctx->eigen_device<Device>(), g.dim_size(0), x.dim_size(1),
              g.dim_size(1), a.dim_size(1), g.flat<T>().data(),
              x.flat<T>().data(), a.flat<T>().data(), b.flat<T>().data(),
              scale.scalar<T>()(), dx->flat<T>().data(), da->flat<T>().data(),
              db->flat<T>().data(), dscale->flat<T>().data());
        }));
  }
};

template <typename Device, typename T>
class BatchedLoraApplyOp : public OpKernel {
 public:
  explicit BatchedLoraApplyOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& y = ctx->input(0);
    const Tensor& x = ctx->input(1);
    const Tensor& a_stack = ctx->input(2);
    const Tensor& b_stack = ctx->input(3);
    const Tensor& ids = ctx->input(4);
    const Tensor& scales = ctx->input(5);
    OP_REQUIRES_OK(ctx, CheckBatchedInputs("BatchedLoraApply", "y", y, x,
                                           a_stack, b_stack, ids, scales));
    OP_REQUIRES_OK(ctx,
                   CheckFiniteScales<T>("BatchedLoraApply", "scales", scales));
    OP_REQUIRES_OK(
        ctx, CheckWorkSizes("BatchedLoraApply", y.dim_size(0), x.dim_size(1),
                            y.dim_size(1), a_stack.dim_size(2)));
    Tensor* y_out = nullptr;
    OP_REQUIRES_OK(
        ctx, ctx->forward_input_or_allocate_output({0}, 0, y.shape(), &y_out));
    AdviseFreshOutput(y_out, &y);
    OP_REQUIRES_OK(ctx, ExceptionsToStatus("BatchedLoraApply", kScratch, [&] {
                     functor::BatchedLoraApply<Device, T>()(
                         ctx->eigen_device<Device>(), y.dim_size(0),
                         x.dim_size(1), y.dim_size(1), a_stack.dim_size(2),
                         a_stack.dim_size(0), y.flat<T>().data(),
                         x.flat<T>().data(), a_stack.flat<T>().data(),
                         b_stack.flat<T>().data(), ids.flat<int32_t>().data(),
                         scales.flat<T>().data(), y_out->flat<T>().data());
                   }));
  }
};

template <typename Device, typename T>
class BatchedLoraApplyGradOp : public OpKernel {
 public:
  explicit BatchedLoraApplyGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& g = ctx->input(0);
    const Tensor& x = ctx->input(1);
    const Tensor& a_stack = ctx->input(2);
    const Tensor& b_stack = ctx->input(3);
    const Tensor& ids = ctx->input(4);
    const Tensor& scales = ctx->input(5);
    OP_REQUIRES_OK(ctx, CheckBatchedInputs("BatchedLoraApplyGrad", "grad", g, x,
                                           a_stack, b_stack, ids, scales));
    OP_REQUIRES_OK(
        ctx, CheckFiniteScales<T>("BatchedLoraApplyGrad", "scales", scales));
    OP_REQUIRES_OK(
        ctx, CheckWorkSizes("BatchedLoraApplyGrad", g.dim_size(0),
                            x.dim_size(1), g.dim_size(1), a_stack.dim_size(2)));
    Tensor *dx, *da, *db, *dscales;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &dx));
    AdviseFreshOutput(dx);
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, a_stack.shape(), &da));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, b_stack.shape(), &db));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, scales.shape(), &dscales));
    OP_REQUIRES_OK(
        ctx, ExceptionsToStatus("BatchedLoraApplyGrad", kScratch, [&] {
          functor::BatchedLoraApplyGrad<Device, T>()(
              ctx->eigen_device<Device>(), g.dim_size(0), x.dim_size(1),
              g.dim_size(1), a_stack.dim_size(2), a_stack.dim_size(0),
              g.flat<T>().data(), x.flat<T>().data(), a_stack.flat<T>().data(),
              b_stack.flat<T>().data(), ids.flat<int32_t>().data(),
              scales.flat<T>().data(), dx->flat<T>().data(),
              da->flat<T>().data(), db->flat<T>().data(),
              dscales->flat<T>().data());
        }));
  }
};

template <typename Device, typename T>
class ResourceLoraMergeOp : public OpKernel {
 public:
  explicit ResourceLoraMergeOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& a = ctx->input(1);
    const Tensor& b = ctx->input(2);
    const Tensor& scale = ctx->input(3);
    OP_REQUIRES_OK(ctx, CheckScalarHandle(ctx, "ResourceLoraMerge", "var"));
    tensorflow::core::RefCountPtr<tensorflow::Var> var;
    const absl::Status lookup = tensorflow::LookupResource(
        ctx, tensorflow::HandleFromInput(ctx, 0), &var);
    OP_REQUIRES(ctx, lookup.ok(),
                absl::InvalidArgumentError(absl::StrCat(
                    "ResourceLoraMerge: var must be the handle of a resource "
                    "variable: ",
                    lookup.message())));
    tensorflow::mutex_lock lock(*var->mu());
    Tensor* w = var->tensor();
    OP_REQUIRES(ctx, var->is_initialized,
                absl::FailedPreconditionError(
                    "ResourceLoraMerge: the variable is not initialized"));
    OP_REQUIRES(
        ctx, w->dtype() == tensorflow::DataTypeToEnum<T>::v(),
        absl::InvalidArgumentError(absl::StrCat(
            "ResourceLoraMerge: the variable has dtype ",
            tensorflow::DataTypeString(w->dtype()),
            " but a, b and scale have dtype ",
            tensorflow::DataTypeString(tensorflow::DataTypeToEnum<T>::v()))));
    OP_REQUIRES_OK(ctx, CheckMergeInputs("ResourceLoraMerge", "var", w->shape(),
                                         a, b, scale));
    OP_REQUIRES_OK(ctx,
                   CheckFiniteScales<T>("ResourceLoraMerge", "scale", scale));
    OP_REQUIRES_OK(ctx, CheckWorkSizes("ResourceLoraMerge", w->dim_size(0), 1,
                                       w->dim_size(1), a.dim_size(1)));
    // As TensorFlow's ResourceApply* ops: while a read still shares the
    // variable's buffer (or reads copy on read), write the result to a new
    // buffer, in the same single pass, and swap it in.
    Tensor* target = w;
    Tensor fresh;
    if (var->copy_on_read_mode.load() || !w->RefCountIsOne()) {
      OP_REQUIRES_OK(ctx, ctx->allocate_temp(w->dtype(), w->shape(), &fresh));
      AdviseFreshOutput(&fresh);
      target = &fresh;
    }
    OP_REQUIRES_OK(ctx, ExceptionsToStatus("ResourceLoraMerge", kScratch, [&] {
                     functor::LoraMerge<Device, T>()(
                         ctx->eigen_device<Device>(), w->dim_size(0),
                         w->dim_size(1), a.dim_size(1), w->flat<T>().data(),
                         a.flat<T>().data(), b.flat<T>().data(),
                         scale.scalar<T>()(), target->flat<T>().data());
                   }));
    if (target == &fresh) *w = fresh;
  }
};

#define TF_LORA_REGISTER_KERNEL(OP, T)                          \
  REGISTER_KERNEL_BUILDER(Name("TfLora>" #OP)                   \
                              .Device(::tensorflow::DEVICE_CPU) \
                              .TypeConstraint<T>("T"),          \
                          OP##Op<CPUDevice, T>)
#define TF_LORA_REGISTER_CPU(T)                     \
  TF_LORA_REGISTER_KERNEL(LoraMerge, T);            \
  TF_LORA_REGISTER_KERNEL(LoraApply, T);            \
  TF_LORA_REGISTER_KERNEL(LoraApplyGrad, T);        \
  TF_LORA_REGISTER_KERNEL(BatchedLoraApply, T);     \
  TF_LORA_REGISTER_KERNEL(BatchedLoraApplyGrad, T); \
  TF_LORA_REGISTER_KERNEL(ResourceLoraMerge, T)

TF_LORA_REGISTER_CPU(float);
TF_LORA_REGISTER_CPU(double);
TF_LORA_REGISTER_CPU(Eigen::half);
TF_LORA_REGISTER_CPU(Eigen::bfloat16);
#undef TF_LORA_REGISTER_CPU
#undef TF_LORA_REGISTER_KERNEL

}  // namespace tf_lora
