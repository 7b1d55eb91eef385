// LoRA op family on GPUs (built with --config=cuda): the kernels policy of
// lora_op_kernels.h over the CUDA launchers of lora_gpu_launch.h, and the GPU
// registrations (every op; float32, float16, bfloat16). The OpKernels and
// their checks are the CPU's. Scalars the checks read (scale, scales) arrive
// in host memory; adapter ids stay on the device, where the kernel checks
// them, and a bad id is read back to name its row.

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/kernels/lora_checks.h"
#include "core/kernels/lora_gpu_launch.h"
#include "core/kernels/lora_op_kernels.h"
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

// The GPU side of lora_op_kernels.h: the CUDA launchers of
// lora_gpu_launch.h on the op's stream, scratch from allocate_temp.
struct GpuKernels {
  static constexpr bool kIdsOnHost = false;  // checked by the kernels

  static void NewOutput(const Tensor*, const Tensor*) {}

  template <typename T>
  static absl::Status Merge(OpKernelContext* ctx, const char* op, int64_t in,
                            int64_t out, int64_t r, const T* w, const T* a,
                            const T* b, T scale, T* result) {
    return Launched(
        op, gpu::LaunchLoraMerge(kDType<T>, CudaStream(ctx), in, out, r, w, a,
                                 b, static_cast<float>(scale), result));
  }

  template <typename T>
  static absl::Status Apply(OpKernelContext* ctx, const ApplyInputs& in,
                            Tensor* y_out, Tensor* xa) {
    Tensor work;
    absl::Status s =
        Workspace(ctx, gpu::LoraApplyWorkspace(in.n(), in.in(), in.r()), &work);
    if (!s.ok()) return s;
    return Launched(
        "LoraApply",
        gpu::LaunchLoraApply(
            kDType<T>, CudaStream(ctx), in.n(), in.in(), in.out(), in.r(),
            in.lead->flat<T>().data(), in.x->flat<T>().data(),
            in.a->flat<T>().data(), in.b->flat<T>().data(),
            static_cast<float>(in.scale->scalar<T>()()),
            y_out->flat<T>().data(), xa->flat<T>().data(), work.data()));
  }

  template <typename T>
  static absl::Status ApplyGrad(OpKernelContext* ctx, const ApplyInputs& in,
                                Tensor* dx, Tensor* da, Tensor* db,
                                Tensor* dscale) {
    Tensor work;
    absl::Status s = Workspace(
        ctx, gpu::LoraApplyGradWorkspace(in.n(), in.in(), in.out(), in.r()),
        &work);
    if (!s.ok()) return s;
    return Launched(
        "LoraApplyGrad",
        gpu::LaunchLoraApplyGrad(
            kDType<T>, CudaStream(ctx), in.n(), in.in(), in.out(), in.r(),
            in.lead->flat<T>().data(), in.x->flat<T>().data(),
            in.a->flat<T>().data(), in.b->flat<T>().data(),
            static_cast<float>(in.scale->scalar<T>()()), dx->flat<T>().data(),
            da->flat<T>().data(), db->flat<T>().data(),
            dscale->flat<T>().data(), work.data(),
            in.xa != nullptr ? in.xa->flat<T>().data() : nullptr,
            in.grad_xa != nullptr ? in.grad_xa->flat<T>().data() : nullptr));
  }

  template <typename T>
  static absl::Status Batched(OpKernelContext* ctx, const BatchedInputs& in,
                              Tensor* y_out, Tensor* xa) {
    constexpr char kOp[] = "BatchedLoraApply";
    Tensor device_scales, bad_row, work;
    absl::Status s = BatchedTemps(ctx, *in.scales, &device_scales, &bad_row);
    if (s.ok()) {
      s = Workspace(ctx,
                    gpu::BatchedLoraApplyWorkspace(in.n(), in.in(), in.r(),
                                                   in.adapters()),
                    &work);
    }
    if (s.ok()) {
      s = Launched(
          kOp,
          gpu::LaunchBatchedLoraApply(
              kDType<T>, CudaStream(ctx), in.n(), in.in(), in.out(), in.r(),
              in.adapters(), in.lead->flat<T>().data(), in.x->flat<T>().data(),
              in.a_stack->flat<T>().data(), in.b_stack->flat<T>().data(),
              in.ids->flat<int32_t>().data(), device_scales.data(),
              y_out->flat<T>().data(), xa->flat<T>().data(), work.data(),
              bad_row.flat<int32_t>().data()));
    }
    return s.ok() ? CheckedIds(ctx, kOp, *in.ids, in.adapters(), bad_row) : s;
  }

  template <typename T>
  static absl::Status BatchedGrad(OpKernelContext* ctx, const BatchedInputs& in,
                                  Tensor* dx, Tensor* da, Tensor* db,
                                  Tensor* dscales) {
    constexpr char kOp[] = "BatchedLoraApplyGrad";
    Tensor device_scales, bad_row, work;
    absl::Status s = BatchedTemps(ctx, *in.scales, &device_scales, &bad_row);
    if (s.ok()) {
      s = Workspace(ctx,
                    gpu::BatchedLoraApplyGradWorkspace(
                        in.n(), in.in(), in.out(), in.r(), in.adapters()),
                    &work);
    }
    if (s.ok()) {
      s = Launched(
          kOp,
          gpu::LaunchBatchedLoraApplyGrad(
              kDType<T>, CudaStream(ctx), in.n(), in.in(), in.out(), in.r(),
              in.adapters(), in.lead->flat<T>().data(), in.x->flat<T>().data(),
              in.a_stack->flat<T>().data(), in.b_stack->flat<T>().data(),
              in.ids->flat<int32_t>().data(), device_scales.data(),
              dx->flat<T>().data(), da->flat<T>().data(), db->flat<T>().data(),
              dscales->flat<T>().data(), work.data(),
              bad_row.flat<int32_t>().data(),
              in.xa != nullptr ? in.xa->flat<T>().data() : nullptr,
              in.grad_xa != nullptr ? in.grad_xa->flat<T>().data() : nullptr));
    }
    return s.ok() ? CheckedIds(ctx, kOp, *in.ids, in.adapters(), bad_row) : s;
  }
};

}  // namespace

#define TF_LORA_REGISTER_GPU(T)                                          \
  TF_LORA_REGISTER_LORA_KERNELS(::tensorflow::DEVICE_GPU, GpuKernels, T, \
                                .HostMemory("scale"), .HostMemory("scales"))
TF_LORA_REGISTER_GPU(float);
TF_LORA_REGISTER_GPU(Eigen::half);
TF_LORA_REGISTER_GPU(Eigen::bfloat16);
#undef TF_LORA_REGISTER_GPU

}  // namespace tf_lora
