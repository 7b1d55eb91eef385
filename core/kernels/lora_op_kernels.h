// LoRA op family: the OpKernels, once for every device. Each reads and checks
// its inputs (lora_checks.h: the same contracts and messages everywhere),
// allocates its outputs and hands the arrays to the device's kernels, a
// policy class with static members (CpuKernels in lora_kernels.cc,
// GpuKernels in lora_kernels_gpu.cc):
//
//   kIdsOnHost                 whether the checks may read adapter ids
//   NewOutput(out, in)         a hook on each fresh output (CPU: huge pages)
//   Merge<T>(ctx, op, in, out, r, w, a, b, scale, result)
//   Apply<T>(ctx, in, y_out, xa), ApplyGrad<T>(ctx, in, dx, da, db, dscale)
//   Batched<T>(ctx, in, y_out, xa), BatchedGrad<T>(ctx, in, dx, da, db,
//   dscales)
//
// each returning the status of the computation. TF_LORA_REGISTER_LORA_KERNELS
// registers all six ops for one device, policy and type.

#ifndef TF_LORA_CORE_KERNELS_LORA_OP_KERNELS_H_
#define TF_LORA_CORE_KERNELS_LORA_OP_KERNELS_H_

#include "core/kernels/lora_checks.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_mgr.h"
#include "tensorflow/core/framework/resource_var.h"
#include "tensorflow/core/framework/tensor.h"

namespace tf_lora {
namespace lora_op_kernels {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;

template <typename Kernels, typename T>
class LoraMergeOp : public OpKernel {
 public:
  explicit LoraMergeOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    lora_checks::MergeInputs in;
    OP_REQUIRES_OK(ctx, lora_checks::ReadMergeInputs<T>(ctx, &in));
    Tensor* merged = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output(
                            {0}, 0, in.w->shape(), &merged));
    Kernels::NewOutput(merged, in.w);
    OP_REQUIRES_OK(ctx, Kernels::template Merge<T>(
                            ctx, "LoraMerge", in.in(), in.out(), in.r(),
                            in.w->flat<T>().data(), in.a->flat<T>().data(),
                            in.b->flat<T>().data(), in.scale->scalar<T>()(),
                            merged->flat<T>().data()));
  }
};

// In place on the variable's buffer, or on a fresh one while a read shares
// it (lora_checks::MergeTarget).
template <typename Kernels, typename T>
class ResourceLoraMergeOp : public OpKernel {
 public:
  explicit ResourceLoraMergeOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    ::tensorflow::core::RefCountPtr<::tensorflow::Var> var;
    OP_REQUIRES_OK(ctx, lora_checks::LookupMergeVariable(ctx, &var));
    ::tensorflow::mutex_lock lock(*var->mu());
    OP_REQUIRES_OK(ctx, lora_checks::CheckMergeVariable<T>(ctx, var.get()));
    Tensor* w = var->tensor();
    const Tensor& a = ctx->input(1);
    const Tensor& b = ctx->input(2);
    Tensor fresh;
    Tensor* target = nullptr;
    OP_REQUIRES_OK(ctx,
                   lora_checks::MergeTarget(ctx, var.get(), &fresh, &target));
    if (target == &fresh) Kernels::NewOutput(&fresh, nullptr);
    OP_REQUIRES_OK(ctx,
                   Kernels::template Merge<T>(
                       ctx, "ResourceLoraMerge", w->dim_size(0), w->dim_size(1),
                       a.dim_size(1), w->flat<T>().data(), a.flat<T>().data(),
                       b.flat<T>().data(), ctx->input(3).scalar<T>()(),
                       target->flat<T>().data()));
    if (target == &fresh) *w = fresh;
  }
};

template <typename Kernels, typename T>
class LoraApplyOp : public OpKernel {
 public:
  explicit LoraApplyOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    lora_checks::ApplyInputs in;
    OP_REQUIRES_OK(ctx,
                   lora_checks::ReadApplyInputs<T>(ctx, "LoraApply", "y", &in));
    Tensor *y_out = nullptr, *xa = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output(
                            {0}, 0, in.lead->shape(), &y_out));
    Kernels::NewOutput(y_out, in.lead);
    ::tensorflow::TensorShape xa_shape;
    OP_REQUIRES_OK(
        ctx, lora_checks::XaShape("LoraApply", "a", *in.x, *in.a, &xa_shape));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, xa_shape, &xa));
    OP_REQUIRES_OK(ctx, Kernels::template Apply<T>(ctx, in, y_out, xa));
  }
};

template <typename Kernels, typename T>
class LoraApplyGradOp : public OpKernel {
 public:
  explicit LoraApplyGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    lora_checks::ApplyInputs in;
    OP_REQUIRES_OK(ctx, lora_checks::ReadApplyGradInputs<T>(ctx, &in));
    Tensor *dx, *da, *db, *dscale;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, in.x->shape(), &dx));
    Kernels::NewOutput(dx, nullptr);
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, in.a->shape(), &da));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, in.b->shape(), &db));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, in.scale->shape(), &dscale));
    OP_REQUIRES_OK(ctx,
                   Kernels::template ApplyGrad<T>(ctx, in, dx, da, db, dscale));
  }
};

template <typename Kernels, typename T>
class BatchedLoraApplyOp : public OpKernel {
 public:
  explicit BatchedLoraApplyOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    lora_checks::BatchedInputs in;
    OP_REQUIRES_OK(
        ctx, lora_checks::ReadBatchedInputs<T>(ctx, "BatchedLoraApply", "y",
                                               Kernels::kIdsOnHost, &in));
    Tensor *y_out = nullptr, *xa = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output(
                            {0}, 0, in.lead->shape(), &y_out));
    Kernels::NewOutput(y_out, in.lead);
    ::tensorflow::TensorShape xa_shape;
    OP_REQUIRES_OK(ctx, lora_checks::XaShape("BatchedLoraApply", "a_stack",
                                             *in.x, *in.a_stack, &xa_shape));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, xa_shape, &xa));
    OP_REQUIRES_OK(ctx, Kernels::template Batched<T>(ctx, in, y_out, xa));
  }
};

template <typename Kernels, typename T>
class BatchedLoraApplyGradOp : public OpKernel {
 public:
  explicit BatchedLoraApplyGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    lora_checks::BatchedInputs in;
    OP_REQUIRES_OK(ctx, lora_checks::ReadBatchedGradInputs<T>(
                            ctx, Kernels::kIdsOnHost, &in));
    Tensor *dx, *da, *db, *dscales;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, in.x->shape(), &dx));
    Kernels::NewOutput(dx, nullptr);
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, in.a_stack->shape(), &da));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, in.b_stack->shape(), &db));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, in.scales->shape(), &dscales));
    OP_REQUIRES_OK(
        ctx, Kernels::template BatchedGrad<T>(ctx, in, dx, da, db, dscales));
  }
};

}  // namespace lora_op_kernels
}  // namespace tf_lora

// One kernel: op OP on DEVICE through the policy KERNELS for type T; further
// builder calls (`.HostMemory("scale")`) follow in the variadic part.
#define TF_LORA_LORA_KERNEL(OP, DEVICE, KERNELS, T, ...)                     \
  REGISTER_KERNEL_BUILDER(                                                   \
      Name("TfLora>" #OP).Device(DEVICE).TypeConstraint<T>("T") __VA_ARGS__, \
      ::tf_lora::lora_op_kernels::OP##Op<KERNELS, T>)

// The six ops of the family. SCALE and SCALES are builder calls for the
// scale inputs (`.HostMemory("scale")` on GPUs, nothing on the CPU).
#define TF_LORA_REGISTER_LORA_KERNELS(DEVICE, KERNELS, T, SCALE, SCALES) \
  TF_LORA_LORA_KERNEL(LoraMerge, DEVICE, KERNELS, T, SCALE);             \
  TF_LORA_LORA_KERNEL(ResourceLoraMerge, DEVICE, KERNELS, T, SCALE);     \
  TF_LORA_LORA_KERNEL(LoraApply, DEVICE, KERNELS, T, SCALE);             \
  TF_LORA_LORA_KERNEL(LoraApplyGrad, DEVICE, KERNELS, T, SCALE);         \
  TF_LORA_LORA_KERNEL(BatchedLoraApply, DEVICE, KERNELS, T, SCALES);     \
  TF_LORA_LORA_KERNEL(BatchedLoraApplyGrad, DEVICE, KERNELS, T, SCALES)

#endif  // TF_LORA_CORE_KERNELS_LORA_OP_KERNELS_H_
