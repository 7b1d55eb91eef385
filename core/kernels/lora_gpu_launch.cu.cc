// lora_gpu_launch.h over the launcher templates of lora_gpu.h.

#include "core/kernels/lora_gpu_launch.h"

#include <type_traits>

#include "core/kernels/lora_gpu.h"

namespace tf_lora {
namespace gpu {
namespace {

// fn(T*) with the storage type of `dtype` (a null pointer as the tag).
template <typename Fn>
int ByDtype(DType dtype, Fn fn) {
  switch (dtype) {
    case DType::kFloat32:
      return static_cast<int>(fn(static_cast<float*>(nullptr)));
    case DType::kFloat16:
      return static_cast<int>(fn(static_cast<Half*>(nullptr)));
    case DType::kBFloat16:
      return static_cast<int>(fn(static_cast<BFloat16*>(nullptr)));
  }
  return static_cast<int>(kInvalidValue);
}

template <typename T>
const T* In(const void* p) {
  return static_cast<const T*>(p);
}

}  // namespace

int LaunchLoraMerge(DType dtype, void* stream, int64_t in, int64_t out,
                    int64_t r, const void* w, const void* a, const void* b,
                    float scale, void* result) {
  return ByDtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return LoraMerge<T>(static_cast<Stream>(stream), in, out, r, In<T>(w),
                        In<T>(a), In<T>(b), scale, static_cast<T*>(result));
  });
}

size_t LoraApplyWorkspace(int64_t n, int64_t in, int64_t r) {
  return LoraApplyWorkspaceBytes(n, in, r);
}

int LaunchLoraApply(DType dtype, void* stream, int64_t n, int64_t in,
                    int64_t out, int64_t r, const void* y, const void* x,
                    const void* a, const void* b, float scale, void* y_out,
                    void* xa, void* workspace) {
  return ByDtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return LoraApply<T>(static_cast<Stream>(stream), n, in, out, r, In<T>(y),
                        In<T>(x), In<T>(a), In<T>(b), scale,
                        static_cast<T*>(y_out), static_cast<T*>(xa), workspace);
  });
}

size_t LoraApplyGradWorkspace(int64_t n, int64_t in, int64_t out, int64_t r) {
  return LoraApplyGradWorkspaceBytes(n, in, out, r);
}

int LaunchLoraApplyGrad(DType dtype, void* stream, int64_t n, int64_t in,
                        int64_t out, int64_t r, const void* g, const void* x,
                        const void* a, const void* b, float scale, void* dx,
                        void* da, void* db, void* dscale, void* workspace,
                        const void* xa, const void* grad_xa) {
  return ByDtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return LoraApplyGrad<T>(static_cast<Stream>(stream), n, in, out, r,
                            In<T>(g), In<T>(x), In<T>(a), In<T>(b), scale,
                            static_cast<T*>(dx), static_cast<T*>(da),
                            static_cast<T*>(db), static_cast<T*>(dscale),
                            workspace, In<T>(xa), In<T>(grad_xa));
  });
}

size_t BatchedLoraApplyWorkspace(int64_t n, int64_t in, int64_t r,
                                 int64_t adapters) {
  return BatchedLoraApplyWorkspaceBytes(n, in, r, adapters);
}

int LaunchBatchedLoraApply(DType dtype, void* stream, int64_t n, int64_t in,
                           int64_t out, int64_t r, int64_t adapters,
                           const void* y, const void* x, const void* a_stack,
                           const void* b_stack, const int32_t* ids,
                           const void* scales, void* y_out, void* xa,
                           void* workspace, int* bad_row) {
  return ByDtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return BatchedLoraApply<T>(
        static_cast<Stream>(stream), n, in, out, r, adapters, In<T>(y),
        In<T>(x), In<T>(a_stack), In<T>(b_stack), ids, In<T>(scales),
        static_cast<T*>(y_out), static_cast<T*>(xa), workspace, bad_row);
  });
}

size_t BatchedLoraApplyGradWorkspace(int64_t n, int64_t in, int64_t out,
                                     int64_t r, int64_t adapters) {
  return BatchedLoraApplyGradWorkspaceBytes(n, in, out, r, adapters);
}

int LaunchBatchedLoraApplyGrad(DType dtype, void* stream, int64_t n, int64_t in,
                               int64_t out, int64_t r, int64_t adapters,
                               const void* g, const void* x,
                               const void* a_stack, const void* b_stack,
                               const int32_t* ids, const void* scales, void* dx,
                               void* da, void* db, void* dscales,
                               void* workspace, int* bad_row, const void* xa,
                               const void* grad_xa) {
  return ByDtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return BatchedLoraApplyGrad<T>(
        static_cast<Stream>(stream), n, in, out, r, adapters, In<T>(g),
        In<T>(x), In<T>(a_stack), In<T>(b_stack), ids, In<T>(scales),
        static_cast<T*>(dx), static_cast<T*>(da), static_cast<T*>(db),
        static_cast<T*>(dscales), workspace, bad_row, In<T>(xa),
        In<T>(grad_xa));
  });
}

int NoBadRow() { return kNoBadRow; }

void SetMaxGridYz(int64_t value) { max_grid_yz = value; }

#if defined(__CUDACC__)
const char* ErrorString(int error) {
  return cudaGetErrorString(static_cast<cudaError_t>(error));
}
#else
const char* ErrorString(int error) {
  return error == 0 ? "no error" : "invalid value (CPU emulation)";
}
#endif

}  // namespace gpu
}  // namespace tf_lora
