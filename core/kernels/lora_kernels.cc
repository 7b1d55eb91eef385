// LoRA op family on the CPU: the kernels policy of lora_op_kernels.h over the
// functors of lora.h, and the CPU registrations.

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
#include "core/kernels/lora_op_kernels.h"
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

// The CPU side of lora_op_kernels.h: lora.h's functors on TensorFlow's CPU
// thread pool, scratch running short turned into an error status.
struct CpuKernels {
  static constexpr bool kIdsOnHost = true;

  static void NewOutput(const Tensor* output, const Tensor* input) {
    AdviseFreshOutput(output, input);
  }

  template <typename T>
  static absl::Status Merge(OpKernelContext* ctx, const char* op, int64_t in,
                            int64_t out, int64_t r, const T* w, const T* a,
                            const T* b, T scale, T* result) {
    return ExceptionsToStatus(op, kScratch, [&] {
      functor::LoraMerge<CPUDevice, T>()(ctx->eigen_device<CPUDevice>(), in,
                                         out, r, w, a, b, scale, result);
    });
  }

  template <typename T>
  static absl::Status Apply(OpKernelContext* ctx, const ApplyInputs& in,
                            Tensor* y_out, Tensor* xa) {
    return ExceptionsToStatus("LoraApply", kScratch, [&] {
      functor::LoraApply<CPUDevice, T>()(
          ctx->eigen_device<CPUDevice>(), in.n(), in.in(), in.out(), in.r(),
          in.lead->flat<T>().data(), in.x->flat<T>().data(),
          in.a->flat<T>().data(), in.b->flat<T>().data(),
          in.scale->scalar<T>()(), y_out->flat<T>().data(),
          xa->flat<T>().data());
    });
  }

  template <typename T>
  static absl::Status ApplyGrad(OpKernelContext* ctx, const ApplyInputs& in,
                                Tensor* dx, Tensor* da, Tensor* db,
                                Tensor* dscale) {
    return ExceptionsToStatus("LoraApplyGrad", kScratch, [&] {
      functor::LoraApplyGrad<CPUDevice, T>()(
          ctx->eigen_device<CPUDevice>(), in.n(), in.in(), in.out(), in.r(),
          in.lead->flat<T>().data(), in.x->flat<T>().data(),
          in.a->flat<T>().data(), in.b->flat<T>().data(),
          in.scale->scalar<T>()(), dx->flat<T>().data(), da->flat<T>().data(),
          db->flat<T>().data(), dscale->flat<T>().data(),
          in.xa != nullptr ? in.xa->flat<T>().data() : nullptr,
          in.grad_xa != nullptr ? in.grad_xa->flat<T>().data() : nullptr);
    });
  }

  template <typename T>
  static absl::Status Batched(OpKernelContext* ctx, const BatchedInputs& in,
                              Tensor* y_out, Tensor* xa) {
    return ExceptionsToStatus("BatchedLoraApply", kScratch, [&] {
      functor::BatchedLoraApply<CPUDevice, T>()(
          ctx->eigen_device<CPUDevice>(), in.n(), in.in(), in.out(), in.r(),
          in.adapters(), in.lead->flat<T>().data(), in.x->flat<T>().data(),
          in.a_stack->flat<T>().data(), in.b_stack->flat<T>().data(),
          in.ids->flat<int32_t>().data(), in.scales->flat<T>().data(),
          y_out->flat<T>().data(), xa->flat<T>().data());
    });
  }

  template <typename T>
  static absl::Status BatchedGrad(OpKernelContext* ctx, const BatchedInputs& in,
                                  Tensor* dx, Tensor* da, Tensor* db,
                                  Tensor* dscales) {
    return ExceptionsToStatus("BatchedLoraApplyGrad", kScratch, [&] {
      functor::BatchedLoraApplyGrad<CPUDevice, T>()(
          ctx->eigen_device<CPUDevice>(), in.n(), in.in(), in.out(), in.r(),
          in.adapters(), in.lead->flat<T>().data(), in.x->flat<T>().data(),
          in.a_stack->flat<T>().data(), in.b_stack->flat<T>().data(),
          in.ids->flat<int32_t>().data(), in.scales->flat<T>().data(),
          dx->flat<T>().data(), da->flat<T>().data(), db->flat<T>().data(),
          dscales->flat<T>().data(),
          in.xa != nullptr ? in.xa->flat<T>().data() : nullptr,
          in.grad_xa != nullptr ? in.grad_xa->flat<T>().data() : nullptr);
    });
  }
};

}  // namespace

#define TF_LORA_REGISTER_CPU(T)  \
  TF_LORA_REGISTER_LORA_KERNELS( \
      ::tensorflow::DEVICE_CPU, CpuKernels, T, /*SCALE=*/, /*SCALES=*/)
TF_LORA_REGISTER_CPU(float);
TF_LORA_REGISTER_CPU(double);
TF_LORA_REGISTER_CPU(Eigen::half);
TF_LORA_REGISTER_CPU(Eigen::bfloat16);
#undef TF_LORA_REGISTER_CPU

}  // namespace tf_lora
