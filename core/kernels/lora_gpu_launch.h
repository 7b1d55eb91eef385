// The LoRA GPU launchers (lora_gpu.h) behind types any C++ compiler knows: a
// dtype tag, void pointers and the stream as void*. The TensorFlow glue
// (lora_kernels_gpu.cc, compiled by the host compiler without CUDA headers)
// and the test harness (tests/gpu) call these; nvcc compiles them
// (lora_gpu_launch.cu.cc). Each returns 0 or the CUDA error, named by
// ErrorString.

#ifndef TF_LORA_CORE_KERNELS_LORA_GPU_LAUNCH_H_
#define TF_LORA_CORE_KERNELS_LORA_GPU_LAUNCH_H_

#include <cstddef>
#include <cstdint>

namespace tf_lora {
namespace gpu {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

int LaunchLoraMerge(DType dtype, void* stream, int64_t in, int64_t out,
                    int64_t r, const void* w, const void* a, const void* b,
                    float scale, void* result);

size_t LoraApplyWorkspace(int64_t n, int64_t in, int64_t r);

// xa [n, r] receives x @ a.
int LaunchLoraApply(DType dtype, void* stream, int64_t n, int64_t in,
                    int64_t out, int64_t r, const void* y, const void* x,
                    const void* a, const void* b, float scale, void* y_out,
                    void* xa, void* workspace);

size_t LoraApplyGradWorkspace(int64_t n, int64_t in, int64_t out, int64_t r);

// dscale is device memory (one element); xa and grad_xa [n, r] or both null
// (lora_gpu.h).
int LaunchLoraApplyGrad(DType dtype, void* stream, int64_t n, int64_t in,
                        int64_t out, int64_t r, const void* g, const void* x,
                        const void* a, const void* b, float scale, void* dx,
                        void* da, void* db, void* dscale, void* workspace,
                        const void* xa, const void* grad_xa);

size_t BatchedLoraApplyWorkspace(int64_t n, int64_t in, int64_t r,
                                 int64_t adapters);

// ids, scales (dtype) and bad_row are device memory; *bad_row is set to
// NoBadRow() when every id is in [-1, adapters), else to the first bad row.
// xa [n, r] receives each row's x @ a_k (zero for id -1).
int LaunchBatchedLoraApply(DType dtype, void* stream, int64_t n, int64_t in,
                           int64_t out, int64_t r, int64_t adapters,
                           const void* y, const void* x, const void* a_stack,
                           const void* b_stack, const int32_t* ids,
                           const void* scales, void* y_out, void* xa,
                           void* workspace, int* bad_row);

size_t BatchedLoraApplyGradWorkspace(int64_t n, int64_t in, int64_t out,
                                     int64_t r, int64_t adapters);

// ids, scales, dscales and bad_row are device memory; xa and grad_xa [n, r]
// or both null (lora_gpu.h).
int LaunchBatchedLoraApplyGrad(DType dtype, void* stream, int64_t n, int64_t in,
                               int64_t out, int64_t r, int64_t adapters,
                               const void* g, const void* x,
                               const void* a_stack, const void* b_stack,
                               const int32_t* ids, const void* scales, void* dx,
                               void* da, void* db, void* dscales,
                               void* workspace, int* bad_row, const void* xa,
                               const void* grad_xa);

int NoBadRow();

// The largest gridDim.y/z the launchers use (CUDA's 65535 by default; larger
// grids go in several launches). Tests lower it to exercise that split.
void SetMaxGridYz(int64_t value);
const char* ErrorString(int error);

}  // namespace gpu
}  // namespace tf_lora

#endif  // TF_LORA_CORE_KERNELS_LORA_GPU_LAUNCH_H_
