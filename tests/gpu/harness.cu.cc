// C entry points over core/kernels/lora_gpu_launch.h for tests/gpu (ctypes):
// built by nvcc (device pointers, a CUDA stream) or as C++ for the CPU
// emulation (host pointers). dtype: 0 float32, 1 float16, 2 bfloat16.
// Returns 0 on success, else the CUDA error (or 1 in the emulation).

#include <cstddef>
#include <cstdint>

#include "core/kernels/lora_gpu_launch.h"

namespace gpu = tf_lora::gpu;

extern "C" {

int tfl_no_bad_row() { return gpu::NoBadRow(); }

// Lowers (or restores) the largest gridDim.y/z launchers use, to test their
// split of larger grids.
void tfl_set_max_grid_yz(int64_t value) { gpu::SetMaxGridYz(value); }

int tfl_lora_merge(int dtype, void* stream, int64_t in, int64_t out, int64_t r,
                   const void* w, const void* a, const void* b, float scale,
                   void* result) {
  return gpu::LaunchLoraMerge(static_cast<gpu::DType>(dtype), stream, in, out,
                              r, w, a, b, scale, result);
}

size_t tfl_lora_apply_workspace(int64_t n, int64_t in, int64_t r) {
  return gpu::LoraApplyWorkspace(n, in, r);
}

int tfl_lora_apply(int dtype, void* stream, int64_t n, int64_t in, int64_t out,
                   int64_t r, const void* y, const void* x, const void* a,
                   const void* b, float scale, void* y_out, void* xa,
                   void* workspace) {
  return gpu::LaunchLoraApply(static_cast<gpu::DType>(dtype), stream, n, in,
                              out, r, y, x, a, b, scale, y_out, xa, workspace);
}

size_t tfl_lora_apply_grad_workspace(int64_t n, int64_t in, int64_t out,
                                     int64_t r) {
  return gpu::LoraApplyGradWorkspace(n, in, out, r);
}

int tfl_lora_apply_grad(int dtype, void* stream, int64_t n, int64_t in,
                        int64_t out, int64_t r, const void* g, const void* x,
                        const void* a, const void* b, float scale, void* dx,
                        void* da, void* db, void* dscale, void* workspace,
                        const void* xa, const void* grad_xa) {
  return gpu::LaunchLoraApplyGrad(static_cast<gpu::DType>(dtype), stream, n, in,
                                  out, r, g, x, a, b, scale, dx, da, db, dscale,
                                  workspace, xa, grad_xa);
}

size_t tfl_batched_lora_apply_workspace(int64_t n, int64_t in, int64_t r,
                                        int64_t adapters) {
  return gpu::BatchedLoraApplyWorkspace(n, in, r, adapters);
}

int tfl_batched_lora_apply(int dtype, void* stream, int64_t n, int64_t in,
                           int64_t out, int64_t r, int64_t adapters,
                           const void* y, const void* x, const void* a_stack,
                           const void* b_stack, const int32_t* ids,
                           const void* scales, void* y_out, void* xa,
                           void* workspace, int* bad_row) {
  return gpu::LaunchBatchedLoraApply(
      static_cast<gpu::DType>(dtype), stream, n, in, out, r, adapters, y, x,
      a_stack, b_stack, ids, scales, y_out, xa, workspace, bad_row);
}

size_t tfl_batched_lora_apply_grad_workspace(int64_t n, int64_t in, int64_t out,
                                             int64_t r, int64_t adapters) {
  return gpu::BatchedLoraApplyGradWorkspace(n, in, out, r, adapters);
}

int tfl_batched_lora_apply_grad(int dtype, void* stream, int64_t n, int64_t in,
                                int64_t out, int64_t r, int64_t adapters,
                                const void* g, const void* x,
                                const void* a_stack, const void* b_stack,
                                const int32_t* ids, const void* scales,
                                void* dx, void* da, void* db, void* dscales,
                                void* workspace, int* bad_row, const void* xa,
                                const void* grad_xa) {
  return gpu::LaunchBatchedLoraApplyGrad(
      static_cast<gpu::DType>(dtype), stream, n, in, out, r, adapters, g, x,
      a_stack, b_stack, ids, scales, dx, da, db, dscales, workspace, bad_row,
      xa, grad_xa);
}

}  // extern "C"
