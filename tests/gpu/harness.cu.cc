// C entry points over core/kernels/lora_gpu.h for tests/gpu (ctypes): the
// same source built by nvcc (device pointers, a CUDA stream) or as C++ for
// the CPU emulation (host pointers). dtype: 0 float32, 1 float16, 2 bfloat16.
// Returns 0 on success, else the CUDA error (or 1 in the emulation).

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "core/kernels/lora_gpu.h"

namespace {

using tf_lora::gpu::BFloat16;
using tf_lora::gpu::Half;
using tf_lora::gpu::Stream;

template <typename Fn>
int ByDtype(int dtype, Fn fn) {
  switch (dtype) {
    case 0:
      return static_cast<int>(fn(static_cast<float*>(nullptr)));
    case 1:
      return static_cast<int>(fn(static_cast<Half*>(nullptr)));
    case 2:
      return static_cast<int>(fn(static_cast<BFloat16*>(nullptr)));
    default:
      return -1;
  }
}

template <typename T>
const T* In(const void* p) {
  return static_cast<const T*>(p);
}

}  // namespace

extern "C" {

int tfl_no_bad_row() { return tf_lora::gpu::kNoBadRow; }

int tfl_lora_merge(int dtype, void* stream, int64_t in, int64_t out, int64_t r,
                   const void* w, const void* a, const void* b, float scale,
                   void* result) {
  return ByDtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return tf_lora::gpu::LoraMerge<T>(static_cast<Stream>(stream), in, out, r,
                                      In<T>(w), In<T>(a), In<T>(b), scale,
                                      static_cast<T*>(result));
  });
}

size_t tfl_lora_apply_workspace(int64_t n, int64_t in, int64_t r) {
  return tf_lora::gpu::LoraApplyWorkspaceBytes(n, in, r);
}

int tfl_lora_apply(int dtype, void* stream, int64_t n, int64_t in, int64_t out,
                   int64_t r, const void* y, const void* x, const void* a,
                   const void* b, float scale, void* y_out, void* workspace) {
  return ByDtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return tf_lora::gpu::LoraApply<T>(static_cast<Stream>(stream), n, in, out,
                                      r, In<T>(y), In<T>(x), In<T>(a), In<T>(b),
                                      scale, static_cast<T*>(y_out), workspace);
  });
}

size_t tfl_batched_lora_apply_workspace(int64_t n, int64_t in, int64_t r,
                                        int64_t adapters) {
  return tf_lora::gpu::BatchedLoraApplyWorkspaceBytes(n, in, r, adapters);
}

int tfl_batched_lora_apply(int dtype, void* stream, int64_t n, int64_t in,
                           int64_t out, int64_t r, int64_t adapters,
                           const void* y, const void* x, const void* a_stack,
                           const void* b_stack, const int32_t* ids,
                           const void* scales, void* y_out, void* workspace,
                           int* bad_row) {
  return ByDtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return tf_lora::gpu::BatchedLoraApply<T>(
        static_cast<Stream>(stream), n, in, out, r, adapters, In<T>(y),
        In<T>(x), In<T>(a_stack), In<T>(b_stack), ids, In<T>(scales),
        static_cast<T*>(y_out), workspace, bad_row);
  });
}

}  // extern "C"
