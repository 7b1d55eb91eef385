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
#include "core/kernels/lora_checks.h"
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

using lora_checks::ApplyInputs;
using lora_checks::BatchedInputs;
using lora_checks::CheckMergeVariable;
using lora_checks::LookupMergeVariable;
using lora_checks::MergeInputs;
using lora_checks::MergeTarget;
using lora_checks::ReadApplyInputs;
using lora_checks::ReadBatchedInputs;
using lora_checks::ReadMergeInputs;

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
    MergeInputs in;
    OP_REQUIRES_OK(ctx, ReadMergeInputs<T>(ctx, &in));
    Tensor* merged = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output(
                            {0}, 0, in.w->shape(), &merged));
    AdviseFreshOutput(merged, in.w);
    OP_REQUIRES_OK(ctx, ExceptionsToStatus("LoraMerge", kScratch, [&] {
                     functor::LoraMerge<Device, T>()(
                         ctx->eigen_device<Device>(), in.in(), in.out(), in.r(),
                         in.w->flat<T>().data(), in.a->flat<T>().data(),
                         in.b->flat<T>().data(), in.scale->scalar<T>()(),
                         merged->flat<T>().data());
                   }));
  }
};

template <typename Device, typename T>
class LoraApplyOp : public OpKernel {
 public:
  explicit LoraApplyOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    ApplyInputs in;
    OP_REQUIRES_OK(ctx, ReadApplyInputs<T>(ctx, "LoraApply", "y", &in));
    Tensor* y_out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output(
                            {0}, 0, in.lead->shape(), &y_out));
    AdviseFreshOutput(y_out, in.lead);
    OP_REQUIRES_OK(ctx, ExceptionsToStatus("LoraApply", kScratch, [&] {
                     functor::LoraApply<Device, T>()(
                         ctx->eigen_device<Device>(), in.n(), in.in(), in.out(),
                         in.r(), in.lead->flat<T>().data(),
                         in.x->flat<T>().data(), in.a->flat<T>().data(),
                         in.b->flat<T>().data(), in.scale->scalar<T>()(),
                         y_out->flat<T>().data());
                   }));
  }
};

template <typename Device, typename T>
class LoraApplyGradOp : public OpKernel {
 public:
  explicit LoraApplyGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    ApplyInputs in;
    OP_REQUIRES_OK(ctx, ReadApplyInputs<T>(ctx, "LoraApplyGrad", "grad", &in));
    Tensor *dx, *da, *db, *dscale;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, in.x->shape(), &dx));
    AdviseFreshOutput(dx);
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, in.a->shape(), &da));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, in.b->shape(), &db));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, in.scale->shape(), &dscale));
    OP_REQUIRES_OK(ctx, ExceptionsToStatus("LoraApplyGrad", kScratch, [&] {
                     functor::LoraApplyGrad<Device, T>()(
                         ctx->eigen_device<Device>(), in.n(), in.in(), in.out(),
                         in.r(), in.lead->flat<T>().data(),
                         in.x->flat<T>().data(), in.a->flat<T>().data(),
                         in.b->flat<T>().data(), in.scale->scalar<T>()(),
                         dx->flat<T>().data(), da->flat<T>().data(),
                         db->flat<T>().data(), dscale->flat<T>().data());
                   }));
  }
};

template <typename Device, typename T>
class BatchedLoraApplyOp : public OpKernel {
 public:
  explicit BatchedLoraApplyOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    BatchedInputs in;
    OP_REQUIRES_OK(ctx, ReadBatchedInputs<T>(ctx, "BatchedLoraApply", "y",
                                             /*ids_on_host=*/true, &in));
    Tensor* y_out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output(
                            {0}, 0, in.lead->shape(), &y_out));
    AdviseFreshOutput(y_out, in.lead);
    OP_REQUIRES_OK(ctx, ExceptionsToStatus("BatchedLoraApply", kScratch, [&] {
                     functor::BatchedLoraApply<Device, T>()(
                         ctx->eigen_device<Device>(), in.n(), in.in(), in.out(),
                         in.r(), in.adapters(), in.lead->flat<T>().data(),
                         in.x->flat<T>().data(), in.a_stack->flat<T>().data(),
                         in.b_stack->flat<T>().data(),
                         in.ids->flat<int32_t>().data(),
                         in.scales->flat<T>().data(), y_out->flat<T>().data());
                   }));
  }
};

template <typename Device, typename T>
class BatchedLoraApplyGradOp : public OpKernel {
 public:
  explicit BatchedLoraApplyGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    BatchedInputs in;
    OP_REQUIRES_OK(ctx,
                   ReadBatchedInputs<T>(ctx, "BatchedLoraApplyGrad", "grad",
                                        /*ids_on_host=*/true, &in));
    Tensor *dx, *da, *db, *dscales;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, in.x->shape(), &dx));
    AdviseFreshOutput(dx);
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, in.a_stack->shape(), &da));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, in.b_stack->shape(), &db));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, in.scales->shape(), &dscales));
    OP_REQUIRES_OK(
        ctx, ExceptionsToStatus("BatchedLoraApplyGrad", kScratch, [&] {
          functor::BatchedLoraApplyGrad<Device, T>()(
              ctx->eigen_device<Device>(), in.n(), in.in(), in.out(), in.r(),
              in.adapters(), in.lead->flat<T>().data(), in.x->flat<T>().data(),
              in.a_stack->flat<T>().data(), in.b_stack->flat<T>().data(),
              in.ids->flat<int32_t>().data(), in.scales->flat<T>().data(),
              dx->flat<T>().data(), da->flat<T>().data(), db->flat<T>().data(),
              dscales->flat<T>().data());
        }));
  }
};

template <typename Device, typename T>
class ResourceLoraMergeOp : public OpKernel {
 public:
  explicit ResourceLoraMergeOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    tensorflow::core::RefCountPtr<tensorflow::Var> var;
    OP_REQUIRES_OK(ctx, LookupMergeVariable(ctx, &var));
    tensorflow::mutex_lock lock(*var->mu());
    OP_REQUIRES_OK(ctx, CheckMergeVariable<T>(ctx, var.get()));
    Tensor* w = var->tensor();
    const Tensor& a = ctx->input(1);
    const Tensor& b = ctx->input(2);
    const Tensor& scale = ctx->input(3);
    Tensor fresh;
    Tensor* target = nullptr;
    OP_REQUIRES_OK(ctx, MergeTarget(ctx, var.get(), &fresh, &target));
    if (target == &fresh) AdviseFreshOutput(&fresh);
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
