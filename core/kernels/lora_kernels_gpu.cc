// LoRA op family: GPU OpKernel glue (built with --config=cuda). The same
// input checks and contracts as the CPU kernels (lora_checks.h), then the
// CUDA launchers of lora_gpu_launch.h on the op's stream. Scalars the checks
// read (scale, scales) arrive in host memory; adapter ids stay on the device,
// where the kernel checks them, and a bad id is read back to name its row.
//
// GPU kernels so far: LoraMerge, ResourceLoraMerge, LoraApply, LoraApplyGrad,
// BatchedLoraApply (float32, float16, bfloat16). BatchedLoraApplyGrad runs on
// the CPU.

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

// In place on the variable's device buffer, as the CPU kernel: while a read
// still shares the buffer (or the variable copies on read), the result goes
// to a new buffer in the same single pass and is swapped in.
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
    Tensor* target = w;
    Tensor fresh;
    if (var->copy_on_read_mode.load() || !w->RefCountIsOne()) {
      OP_REQUIRES_OK(ctx, ctx->allocate_temp(w->dtype(), w->shape(), &fresh));
      target = &fresh;
    }
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

template <typename T>
class BatchedLoraApplyGpuOp : public OpKernel {
 public:
  explicit BatchedLoraApplyGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    constexpr char kOp[] = "BatchedLoraApply";
    BatchedInputs in;  // scales in host memory; ids on the device
    OP_REQUIRES_OK(ctx, ReadBatchedInputs<T>(ctx, kOp, "y",
                                             /*ids_on_host=*/false, &in));
    const Tensor& y = *in.lead;
    const Tensor& ids = *in.ids;
    const Tensor& scales = *in.scales;
    const int64_t n = in.n(), adapters = in.adapters();
    Tensor* y_out = nullptr;
    OP_REQUIRES_OK(
        ctx, ctx->forward_input_or_allocate_output({0}, 0, y.shape(), &y_out));
    stream_executor::Stream* stream = StreamOf(ctx);
    // The scales the checks read on the host, for the kernel on the device.
    Tensor device_scales, bad_row, work;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(scales.dtype(), scales.shape(),
                                           &device_scales));
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_INT32,
                                           TensorShape({1}), &bad_row));
    OP_REQUIRES_OK(ctx, Workspace(ctx,
                                  gpu::BatchedLoraApplyWorkspace(
                                      n, in.in(), in.r(), adapters),
                                  &work));
    if (scales.NumElements() > 0) {
      stream_executor::DeviceAddressBase dst(device_scales.data(),
                                             device_scales.TotalBytes());
      OP_REQUIRES_OK(ctx,
                     stream->Memcpy(&dst, scales.data(), scales.TotalBytes()));
    }
    int32_t* bad = bad_row.flat<int32_t>().data();
    OP_REQUIRES_OK(
        ctx,
        Launched(kOp,
                 gpu::LaunchBatchedLoraApply(
                     kDType<T>, CudaStream(ctx), n, in.in(), in.out(), in.r(),
                     adapters, y.flat<T>().data(), in.x->flat<T>().data(),
                     in.a_stack->flat<T>().data(), in.b_stack->flat<T>().data(),
                     ids.flat<int32_t>().data(), device_scales.data(),
                     y_out->flat<T>().data(), work.data(), bad)));
    if (n == 0) return;
    // The ids are checked on the device; one 4-byte read (and a wait for the
    // stream) tells whether any was out of range, as the CPU kernel reports.
    int32_t first_bad = 0;
    stream_executor::DeviceAddressBase bad_mem(bad, sizeof(int32_t));
    OP_REQUIRES_OK(ctx, stream->Memcpy(&first_bad, bad_mem, sizeof(int32_t)));
    OP_REQUIRES_OK(ctx, stream->BlockHostUntilDone());
    if (first_bad == gpu::NoBadRow()) return;
    int32_t id = 0;
    stream_executor::DeviceAddressBase id_mem(
        const_cast<int32_t*>(ids.flat<int32_t>().data()) + first_bad,
        sizeof(int32_t));
    OP_REQUIRES_OK(ctx, stream->Memcpy(&id, id_mem, sizeof(int32_t)));
    OP_REQUIRES_OK(ctx, stream->BlockHostUntilDone());
    ctx->SetStatus(absl::InvalidArgumentError(absl::StrCat(
        kOp, ": adapter_ids[", first_bad, "] = ", id, " is out of range [-1, ",
        adapters, ") (", adapters, " adapters; -1 means no adapter)")));
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
#define TF_LORA_REGISTER_GPU(T)                      \
  TF_LORA_GPU_KERNEL(LoraMerge, T, "scale");         \
  TF_LORA_GPU_KERNEL(LoraApply, T, "scale");         \
  TF_LORA_GPU_KERNEL(LoraApplyGrad, T, "scale");     \
  TF_LORA_GPU_KERNEL(BatchedLoraApply, T, "scales"); \
  TF_LORA_GPU_KERNEL(ResourceLoraMerge, T, "scale")

TF_LORA_REGISTER_GPU(float);
TF_LORA_REGISTER_GPU(Eigen::half);
TF_LORA_REGISTER_GPU(Eigen::bfloat16);
#undef TF_LORA_GPU_KERNEL
#undef TF_LORA_REGISTER_GPU

}  // namespace tf_lora
