// LoRA op family: GPU OpKernel glue (built with --config=cuda). The same
// input checks and contracts as the CPU kernels (lora_checks.h), then the
// CUDA launchers of lora_gpu_launch.h on the op's stream. Scalars the checks
// read (scale, scales) arrive in host memory; adapter ids stay on the device,
// where the kernel checks them, and a bad id is read back to name its row.
//
// GPU kernels for every op of the family (float32, float16, bfloat16).

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/kernels/lora_checks.h"
#include "core/kernels/lora_gpu_launch.h"
#include "tensorflow/core/framework/device_base.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_mgr.h"
#include "tensorflow/core/framework/resource_var.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/types.h"
#include "xla/stream_executor/device_address.h"
#include "xla/stream_executor/stream.h"

namespace tf_lora {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;

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

template <typename T>
constexpr gpu::DType kDType = gpu::DType::kFloat32;
template <>
constexpr gpu::DType kDType<Eigen::half> = gpu::DType::kFloat16;
template <>
constexpr gpu::DType kDType<Eigen::bfloat16> = gpu::DType::kBFloat16;

stream_executor::Stream* StreamOf(OpKernelContext* ctx) {
  return ctx->op_device_context()->stream();
}

void* CudaStream(OpKernelContext* ctx) {
  return StreamOf(ctx)->platform_specific_handle().stream;
}

absl::Status Launched(const char* op, int error) {
  if (error == 0) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(op, ": CUDA kernel launch failed (",
                                          gpu::ErrorString(error), ")"));
}

// Scratch on the device: `bytes` as an int8 tensor that lives for the call.
absl::Status Workspace(OpKernelContext* ctx, size_t bytes, Tensor* out) {
  return ctx->allocate_temp(tensorflow::DT_INT8,
                            TensorShape({static_cast<int64_t>(bytes)}), out);
}

template <typename T>
class LoraMergeGpuOp : public OpKernel {
 public:
  explicit LoraMergeGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    MergeInputs in;
    OP_REQUIRES_OK(ctx, ReadMergeInputs<T>(ctx, &in));
    Tensor* merged = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output(
                            {0}, 0, in.w->shape(), &merged));
    OP_REQUIRES_OK(
        ctx, Launched("LoraMerge",
                      gpu::LaunchLoraMerge(
                          kDType<T>, CudaStream(ctx), in.in(), in.out(), in.r(),
                          in.w->flat<T>().data(), in.a->flat<T>().data(),
                          in.b->flat<T>().data(),
                          static_cast<float>(in.scale->scalar<T>()()),
                          merged->flat<T>().data())));
  }
};

template <typename T>
class LoraApplyGpuOp : public OpKernel {
 public:
  explicit LoraApplyGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    ApplyInputs in;
    OP_REQUIRES_OK(ctx, ReadApplyInputs<T>(ctx, "LoraApply", "y", &in));
    Tensor* y_out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output(
                            {0}, 0, in.lead->shape(), &y_out));
    Tensor work;
    OP_REQUIRES_OK(
        ctx, Workspace(ctx, gpu::LoraApplyWorkspace(in.n(), in.in(), in.r()),
                       &work));
    OP_REQUIRES_OK(
        ctx,
        Launched("LoraApply",
                 gpu::LaunchLoraApply(
                     kDType<T>, CudaStream(ctx), in.n(), in.in(), in.out(),
                     in.r(), in.lead->flat<T>().data(), in.x->flat<T>().data(),
                     in.a->flat<T>().data(), in.b->flat<T>().data(),
                     static_cast<float>(in.scale->scalar<T>()()),
                     y_out->flat<T>().data(), work.data())));
  }
};

template <typename T>
class LoraApplyGradGpuOp : public OpKernel {
 public:
  explicit LoraApplyGradGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    ApplyInputs in;
    OP_REQUIRES_OK(ctx, ReadApplyInputs<T>(ctx, "LoraApplyGrad", "grad", &in));
    Tensor *dx, *da, *db, *dscale;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, in.x->shape(), &dx));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, in.a->shape(), &da));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, in.b->shape(), &db));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, in.scale->shape(), &dscale));
    Tensor work;
    OP_REQUIRES_OK(ctx, Workspace(ctx,
                                  gpu::LoraApplyGradWorkspace(in.n(), in.in(),
                                                              in.out(), in.r()),
                                  &work));
    OP_REQUIRES_OK(
        ctx,
        Launched(
            "LoraApplyGrad",
            gpu::LaunchLoraApplyGrad(
                kDType<T>, CudaStream(ctx), in.n(), in.in(), in.out(), in.r(),
                in.lead->flat<T>().data(), in.x->flat<T>().data(),
                in.a->flat<T>().data(), in.b->flat<T>().data(),
                static_cast<float>(in.scale->scalar<T>()()),
                dx->flat<T>().data(), da->flat<T>().data(),
                db->flat<T>().data(), dscale->flat<T>().data(), work.data())));
  }
};

// In place on the variable's device buffer, as the CPU kernel (MergeTarget).
template <typename T>
class ResourceLoraMergeGpuOp : public OpKernel {
 public:
  explicit ResourceLoraMergeGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

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
    OP_REQUIRES_OK(
        ctx, Launched("ResourceLoraMerge",
                      gpu::LaunchLoraMerge(
                          kDType<T>, CudaStream(ctx), w->dim_size(0),
                          w->dim_size(1), a.dim_size(1), w->flat<T>().data(),
                          a.flat<T>().data(), b.flat<T>().data(),
                          static_cast<float>(scale.scalar<T>()()),
                          target->flat<T>().data())));
    if (target == &fresh) *w = fresh;
  }
};

// The per-adapter scales, read by the checks in host memory, copied to the
// device for the kernel; and a device int for the kernel's first bad row.
absl::Status BatchedTemps(OpKernelContext* ctx, const Tensor& scales,
                          Tensor* device_scales, Tensor* bad_row) {
  absl::Status s =
      ctx->allocate_temp(scales.dtype(), scales.shape(), device_scales);
  if (s.ok()) {
    s = ctx->allocate_temp(tensorflow::DT_INT32, TensorShape({1}), bad_row);
  }
  if (!s.ok() || scales.NumElements() == 0) return s;
  stream_executor::DeviceAddressBase dst(device_scales->data(),
                                         device_scales->TotalBytes());
  return StreamOf(ctx)->Memcpy(&dst, scales.data(), scales.TotalBytes());
}

// After a batched kernel: the ids were checked on the device; one 4-byte read
// (and a wait for the stream) tells whether any was out of range, reported
// as the CPU kernel reports it.
absl::Status CheckedIds(OpKernelContext* ctx, const char* op, const Tensor& ids,
                        int64_t adapters, const Tensor& bad_row) {
  if (ids.NumElements() == 0) return absl::OkStatus();
  stream_executor::Stream* stream = StreamOf(ctx);
  int32_t first_bad = 0;
  stream_executor::DeviceAddressBase bad_mem(
      const_cast<void*>(static_cast<const void*>(bad_row.data())),
      sizeof(int32_t));
  absl::Status s = stream->Memcpy(&first_bad, bad_mem, sizeof(int32_t));
  if (s.ok()) s = stream->BlockHostUntilDone();
  if (!s.ok() || first_bad == gpu::NoBadRow()) return s;
  int32_t id = 0;
  stream_executor::DeviceAddressBase id_mem(
      const_cast<int32_t*>(ids.flat<int32_t>().data()) + first_bad,
      sizeof(int32_t));
  s = stream->Memcpy(&id, id_mem, sizeof(int32_t));
  if (s.ok()) s = stream->BlockHostUntilDone();
  if (!s.ok()) return s;
  return absl::InvalidArgumentError(absl::StrCat(
      op, ": adapter_ids[", first_bad, "] = ", id, " is out of range [-1, ",
      adapters, ") (", adapters, " adapters; -1 means no adapter)"));
}

template <typename T>
class BatchedLoraApplyGpuOp : public OpKernel {
 public:
  explicit BatchedLoraApplyGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    constexpr char kOp[] = "BatchedLoraApply";
    BatchedInputs in;  // scales in host memory; ids on the device
    OP_REQUIRES_OK(ctx, ReadBatchedInputs<T>(ctx, kOp, "y",
                                             /*ids_on_host=*/false, &in));
    Tensor* y_out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output(
                            {0}, 0, in.lead->shape(), &y_out));
    Tensor device_scales, bad_row, work;
    OP_REQUIRES_OK(ctx,
                   BatchedTemps(ctx, *in.scales, &device_scales, &bad_row));
    OP_REQUIRES_OK(ctx, Workspace(ctx,
                                  gpu::BatchedLoraApplyWorkspace(
                                      in.n(), in.in(), in.r(), in.adapters()),
                                  &work));
    OP_REQUIRES_OK(
        ctx,
        Launched(kOp, gpu::LaunchBatchedLoraApply(
                          kDType<T>, CudaStream(ctx), in.n(), in.in(), in.out(),
                          in.r(), in.adapters(), in.lead->flat<T>().data(),
                          in.x->flat<T>().data(), in.a_stack->flat<T>().data(),
                          in.b_stack->flat<T>().data(),
                          in.ids->flat<int32_t>().data(), device_scales.data(),
                          y_out->flat<T>().data(), work.data(),
                          bad_row.flat<int32_t>().data())));
    OP_REQUIRES_OK(ctx, CheckedIds(ctx, kOp, *in.ids, in.adapters(), bad_row));
  }
};

template <typename T>
class BatchedLoraApplyGradGpuOp : public OpKernel {
 public:
  explicit BatchedLoraApplyGradGpuOp(OpKernelConstruction* ctx)
      : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    constexpr char kOp[] = "BatchedLoraApplyGrad";
    BatchedInputs in;
    OP_REQUIRES_OK(ctx, ReadBatchedInputs<T>(ctx, kOp, "grad",
                                             /*ids_on_host=*/false, &in));
    Tensor *dx, *da, *db, *dscales;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, in.x->shape(), &dx));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, in.a_stack->shape(), &da));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, in.b_stack->shape(), &db));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, in.scales->shape(), &dscales));
    Tensor device_scales, bad_row, work;
    OP_REQUIRES_OK(ctx,
                   BatchedTemps(ctx, *in.scales, &device_scales, &bad_row));
    OP_REQUIRES_OK(
        ctx, Workspace(ctx,
                       gpu::BatchedLoraApplyGradWorkspace(
                           in.n(), in.in(), in.out(), in.r(), in.adapters()),
                       &work));
    OP_REQUIRES_OK(
        ctx,
        Launched(kOp, gpu::LaunchBatchedLoraApplyGrad(
                          kDType<T>, CudaStream(ctx), in.n(), in.in(), in.out(),
                          in.r(), in.adapters(), in.lead->flat<T>().data(),
                          in.x->flat<T>().data(), in.a_stack->flat<T>().data(),
                          in.b_stack->flat<T>().data(),
                          in.ids->flat<int32_t>().data(), device_scales.data(),
                          dx->flat<T>().data(), da->flat<T>().data(),
                          db->flat<T>().data(), dscales->flat<T>().data(),
                          work.data(), bad_row.flat<int32_t>().data())));
    OP_REQUIRES_OK(ctx, CheckedIds(ctx, kOp, *in.ids, in.adapters(), bad_row));
  }
};

}  // namespace

// One GPU kernel: op OP, type T, the input read on the host (the scalars the
// checks read).
#define TF_LORA_GPU_KERNEL(OP, T, HOST_INPUT)                   \
  REGISTER_KERNEL_BUILDER(Name("TfLora>" #OP)                   \
                              .Device(::tensorflow::DEVICE_GPU) \
                              .TypeConstraint<T>("T")           \
                              .HostMemory(HOST_INPUT),          \
                          OP##GpuOp<T>)
#define TF_LORA_REGISTER_GPU(T)                          \
  TF_LORA_GPU_KERNEL(LoraMerge, T, "scale");             \
  TF_LORA_GPU_KERNEL(LoraApply, T, "scale");             \
  TF_LORA_GPU_KERNEL(LoraApplyGrad, T, "scale");         \
  TF_LORA_GPU_KERNEL(BatchedLoraApply, T, "scales");     \
  TF_LORA_GPU_KERNEL(BatchedLoraApplyGrad, T, "scales"); \
  TF_LORA_GPU_KERNEL(ResourceLoraMerge, T, "scale")

TF_LORA_REGISTER_GPU(float);
TF_LORA_REGISTER_GPU(Eigen::half);
TF_LORA_REGISTER_GPU(Eigen::bfloat16);
#undef TF_LORA_GPU_KERNEL
#undef TF_LORA_REGISTER_GPU

}  // namespace tf_lora
