// LoRA op family: OpKernel glue. Checks inputs, allocates outputs, calls the
// functors of lora.h.

#define EIGEN_USE_THREADS

#include "core/kernels/lora.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_mgr.h"
#include "tensorflow/core/framework/resource_var.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"

namespace tf_lora {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShapeUtils;
using CPUDevice = Eigen::ThreadPoolDevice;

template <typename Device, typename T>
class LoraMergeOp : public OpKernel {
 public:
  explicit LoraMergeOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& w = ctx->input(0);
    const Tensor& a = ctx->input(1);
    const Tensor& b = ctx->input(2);
    const Tensor& scale = ctx->input(3);
    const auto received = [&] {
      return absl::StrCat("; got w ", w.shape().DebugString(), ", a ",
                          a.shape().DebugString(), ", b ",
                          b.shape().DebugString(), ", scale ",
                          scale.shape().DebugString());
    };
    OP_REQUIRES(
        ctx,
        TensorShapeUtils::IsMatrix(w.shape()) &&
            TensorShapeUtils::IsMatrix(a.shape()) &&
            TensorShapeUtils::IsMatrix(b.shape()) &&
            TensorShapeUtils::IsScalar(scale.shape()),
        absl::InvalidArgumentError(absl::StrCat(
            "LoraMerge: expected w [in, out], a [in, r], b [r, out] and a "
            "scalar scale",
            received())));
    const int64_t in = w.dim_size(0), out = w.dim_size(1), r = a.dim_size(1);
    OP_REQUIRES(
        ctx, a.dim_size(0) == in && b.dim_size(0) == r && b.dim_size(1) == out,
        absl::InvalidArgumentError(
            absl::StrCat("LoraMerge: expected a [", in, ", r] and b [r, ", out,
                         "] to match w [in, out] and each other", received())));

    Tensor* merged = nullptr;
    OP_REQUIRES_OK(
        ctx, ctx->forward_input_or_allocate_output({0}, 0, w.shape(), &merged));
    functor::LoraMerge<Device, T>()(ctx->eigen_device<Device>(), in, out, r,
                                    w.flat<T>().data(), a.flat<T>().data(),
                                    b.flat<T>().data(), scale.scalar<T>()(),
                                    merged->flat<T>().data());
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
    const auto received = [&] {
      return absl::StrCat(
          "; got y ", y.shape().DebugString(), ", x ", x.shape().DebugString(),
          ", a ", a.shape().DebugString(), ", b ", b.shape().DebugString(),
          ", scale ", scale.shape().DebugString());
    };
    OP_REQUIRES(ctx,
                TensorShapeUtils::IsMatrix(y.shape()) &&
                    TensorShapeUtils::IsMatrix(x.shape()) &&
                    TensorShapeUtils::IsMatrix(a.shape()) &&
                    TensorShapeUtils::IsMatrix(b.shape()) &&
                    TensorShapeUtils::IsScalar(scale.shape()),
                absl::InvalidArgumentError(absl::StrCat(
                    "LoraApply: expected y [N, out], x [N, in], a [in, r], "
                    "b [r, out] and a scalar scale",
                    received())));
    const int64_t n = y.dim_size(0), out = y.dim_size(1), in = x.dim_size(1),
                  r = a.dim_size(1);
    OP_REQUIRES(ctx,
                x.dim_size(0) == n && a.dim_size(0) == in &&
                    b.dim_size(0) == r && b.dim_size(1) == out,
                absl::InvalidArgumentError(absl::StrCat(
                    "LoraApply: expected x [", n, ", in], a [in, r] and b [r, ",
                    out, "] to match y [N, out] and each other", received())));

    Tensor* y_out = nullptr;
    OP_REQUIRES_OK(
        ctx, ctx->forward_input_or_allocate_output({0}, 0, y.shape(), &y_out));
    functor::LoraApply<Device, T>()(
        ctx->eigen_device<Device>(), n, in, out, r, y.flat<T>().data(),
        x.flat<T>().data(), a.flat<T>().data(), b.flat<T>().data(),
        scale.scalar<T>()(), y_out->flat<T>().data());
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
    const auto received = [&] {
      return absl::StrCat(
          "; got grad ", g.shape().DebugString(), ", x ",
          x.shape().DebugString(), ", a ", a.shape().DebugString(), ", b ",
          b.shape().DebugString(), ", scale ", scale.shape().DebugString());
    };
    OP_REQUIRES(ctx,
                TensorShapeUtils::IsMatrix(g.shape()) &&
                    TensorShapeUtils::IsMatrix(x.shape()) &&
                    TensorShapeUtils::IsMatrix(a.shape()) &&
                    TensorShapeUtils::IsMatrix(b.shape()) &&
                    TensorShapeUtils::IsScalar(scale.shape()),
                absl::InvalidArgumentError(absl::StrCat(
                    "LoraApplyGrad: expected grad [N, out], x [N, in], "
                    "a [in, r], b [r, out] and a scalar scale",
                    received())));
    const int64_t n = g.dim_size(0), out = g.dim_size(1), in = x.dim_size(1),
                  r = a.dim_size(1);
    OP_REQUIRES(
        ctx,
        x.dim_size(0) == n && a.dim_size(0) == in && b.dim_size(0) == r &&
            b.dim_size(1) == out,
        absl::InvalidArgumentError(absl::StrCat(
            "LoraApplyGrad: expected x [", n, ", in], a [in, r] and b [r, ",
            out, "] to match grad [N, out] and each other", received())));
    Tensor *dx, *da, *db, *dscale;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &dx));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, a.shape(), &da));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, b.shape(), &db));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, scale.shape(), &dscale));
    functor::LoraApplyGrad<Device, T>()(
        ctx->eigen_device<Device>(), n, in, out, r, g.flat<T>().data(),
        x.flat<T>().data(), a.flat<T>().data(), b.flat<T>().data(),
        scale.scalar<T>()(), dx->flat<T>().data(), da->flat<T>().data(),
        db->flat<T>().data(), dscale->flat<T>().data());
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
    const auto received = [&] {
      return absl::StrCat("; got var ", w->shape().DebugString(), ", a ",
                          a.shape().DebugString(), ", b ",
                          b.shape().DebugString(), ", scale ",
                          scale.shape().DebugString());
    };
    OP_REQUIRES(ctx,
                TensorShapeUtils::IsMatrix(w->shape()) &&
                    TensorShapeUtils::IsMatrix(a.shape()) &&
                    TensorShapeUtils::IsMatrix(b.shape()) &&
                    TensorShapeUtils::IsScalar(scale.shape()),
                absl::InvalidArgumentError(absl::StrCat(
                    "ResourceLoraMerge: expected var [in, out], a [in, r], "
                    "b [r, out] and a scalar scale",
                    received())));
    const int64_t in = w->dim_size(0), out = w->dim_size(1), r = a.dim_size(1);
    OP_REQUIRES(
        ctx, a.dim_size(0) == in && b.dim_size(0) == r && b.dim_size(1) == out,
        absl::InvalidArgumentError(absl::StrCat(
            "ResourceLoraMerge: expected a [", in, ", r] and b [r, ", out,
            "] to match var [in, out] and each other", received())));

    // As TensorFlow's ResourceApply* ops: while a read still shares the
    // variable's buffer (or reads copy on read), write the result to a new
    // buffer, in the same single pass, and swap it in.
    Tensor* target = w;
    Tensor fresh;
    if (var->copy_on_read_mode.load() || !w->RefCountIsOne()) {
      OP_REQUIRES_OK(ctx, ctx->allocate_temp(w->dtype(), w->shape(), &fresh));
      target = &fresh;
    }
    functor::LoraMerge<Device, T>()(ctx->eigen_device<Device>(), in, out, r,
                                    w->flat<T>().data(), a.flat<T>().data(),
                                    b.flat<T>().data(), scale.scalar<T>()(),
                                    target->flat<T>().data());
    if (target == &fresh) *w = fresh;
  }
};

#define TF_LORA_REGISTER_CPU(T)                                 \
  REGISTER_KERNEL_BUILDER(Name("TfLora>LoraMerge")              \
                              .Device(::tensorflow::DEVICE_CPU) \
                              .TypeConstraint<T>("T"),          \
                          LoraMergeOp<CPUDevice, T>);           \
  REGISTER_KERNEL_BUILDER(Name("TfLora>LoraApply")              \
                              .Device(::tensorflow::DEVICE_CPU) \
                              .TypeConstraint<T>("T"),          \
                          LoraApplyOp<CPUDevice, T>);           \
  REGISTER_KERNEL_BUILDER(Name("TfLora>LoraApplyGrad")          \
                              .Device(::tensorflow::DEVICE_CPU) \
                              .TypeConstraint<T>("T"),          \
                          LoraApplyGradOp<CPUDevice, T>);       \
  REGISTER_KERNEL_BUILDER(Name("TfLora>ResourceLoraMerge")      \
                              .Device(::tensorflow::DEVICE_CPU) \
                              .TypeConstraint<T>("T"),          \
                          ResourceLoraMergeOp<CPUDevice, T>)

TF_LORA_REGISTER_CPU(float);
TF_LORA_REGISTER_CPU(double);
TF_LORA_REGISTER_CPU(Eigen::half);
TF_LORA_REGISTER_CPU(Eigen::bfloat16);
#undef TF_LORA_REGISTER_CPU

}  // namespace tf_lora
