// What the LoRA GPU kernels (lora_gpu.cu.cc) need from CUDA, in one place, so
// that the same kernel source also compiles as plain C++ for the CPU
// emulation that tests their index arithmetic on machines without a GPU
// (tests/gpu/emulation_test.cc): under nvcc this is CUDA itself; otherwise
// each block runs on blockDim.x * blockDim.y host threads that meet at a
// barrier, one block after another, with __shared__ arrays as statics.
//
// Kernels use only what is below: TF_LORA_GLOBAL / TF_LORA_DEVICE functions,
// TF_LORA_SHARED arrays, SyncThreads, AtomicAdd / AtomicMin on int, Copy16,
// the Half / BFloat16 storage types with ToFloat / FromFloat, and
// TF_LORA_LAUNCH(kernel, grid, block, stream, args...).

#ifndef TF_LORA_CORE_KERNELS_GPU_PORTABILITY_H_
#define TF_LORA_CORE_KERNELS_GPU_PORTABILITY_H_

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define TF_LORA_GLOBAL __global__
#define TF_LORA_DEVICE __device__ __forceinline__
#define TF_LORA_SHARED __shared__
#define TF_LORA_LAUNCH(kernel, grid, block, stream, ...) \
  kernel<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__)

namespace tf_lora {
namespace gpu {

// The largest gridDim.y and gridDim.z a launch may use (CUDA's limit);
// launchers split larger grids. Tests lower it to exercise the split.
inline int64_t max_grid_yz = 65535;

using Half = __half;
using BFloat16 = __nv_bfloat16;
using Stream = cudaStream_t;
using Error = cudaError_t;
constexpr Error kSuccess = cudaSuccess;

TF_LORA_DEVICE void SyncThreads() { __syncthreads(); }
TF_LORA_DEVICE int AtomicAdd(int* p, int v) { return atomicAdd(p, v); }
TF_LORA_DEVICE void AtomicMin(int* p, int v) { atomicMin(p, v); }
TF_LORA_DEVICE float ToFloat(float v) { return v; }
TF_LORA_DEVICE float ToFloat(Half v) { return __half2float(v); }
TF_LORA_DEVICE float ToFloat(BFloat16 v) { return __bfloat162float(v); }
template <typename T>
TF_LORA_DEVICE T FromFloat(float v);
template <>
TF_LORA_DEVICE float FromFloat<float>(float v) {
  return v;
}
template <>
TF_LORA_DEVICE Half FromFloat<Half>(float v) {
  return __float2half_rn(v);
}
template <>
TF_LORA_DEVICE BFloat16 FromFloat<BFloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Copies 16 bytes between 16-byte-aligned addresses in one access.
TF_LORA_DEVICE void Copy16(void* dst, const void* src) {
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
}

constexpr cudaError_t kInvalidValue = cudaErrorInvalidValue;
inline Error LastLaunchError() { return cudaGetLastError(); }
inline Error MemsetAsync(void* p, int value, size_t bytes, Stream s) {
  return cudaMemsetAsync(p, value, bytes, s);
}
inline Error CopyAsync(void* dst, const void* src, size_t bytes, Stream s) {
  return cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, s);
}

}  // namespace gpu
}  // namespace tf_lora

#else  // CPU emulation

#include <atomic>
#include <barrier>
#include <functional>
#include <thread>
#include <vector>

#define TF_LORA_GLOBAL
#define TF_LORA_DEVICE inline
#define TF_LORA_SHARED static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1)
      : x(x_), y(y_), z(z_) {}
};

namespace tf_lora {
namespace gpu {
// The largest gridDim.y and gridDim.z a launch may use (CUDA's limit, which
// the emulation enforces as CUDA does); launchers split larger grids. Tests
// lower it to exercise the split.
inline int64_t max_grid_yz = 65535;

namespace emulation {
inline thread_local dim3 thread_idx, block_idx;
inline dim3 block_dim, grid_dim;
inline std::barrier<>* block_barrier = nullptr;
inline int launch_error = 0;  // what cudaGetLastError would report

// Runs fn(args...) as every thread of every block: the block's threads run
// concurrently (they meet at SyncThreads), blocks one after another.
template <typename Fn>
void Launch(dim3 grid, dim3 block, Fn fn) {
  if (static_cast<int64_t>(grid.y) > max_grid_yz ||
      static_cast<int64_t>(grid.z) > max_grid_yz) {
    launch_error = 1;  // cudaErrorInvalidConfiguration: the kernel does not run
    return;
  }
  grid_dim = grid;
  block_dim = block;
  const unsigned threads = block.x * block.y * block.z;
  std::barrier<> barrier(threads);
  block_barrier = &barrier;
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      thread_idx =
          dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
      for (unsigned z = 0; z < grid.z; ++z) {
        for (unsigned y = 0; y < grid.y; ++y) {
          for (unsigned x = 0; x < grid.x; ++x) {
            block_idx = dim3(x, y, z);
            fn();
            barrier.arrive_and_wait();  // the next block reuses the statics
          }
        }
      }
    });
  }
  for (auto& t : pool) t.join();
  block_barrier = nullptr;
}
}  // namespace emulation

struct Half {
  _Float16 v;
};
struct BFloat16 {
  uint16_t bits;
};
using Stream = void*;
using Error = int;
constexpr Error kSuccess = 0;

inline void SyncThreads() { emulation::block_barrier->arrive_and_wait(); }
inline int AtomicAdd(int* p, int v) {
  return std::atomic_ref<int>(*p).fetch_add(v);
}
inline void AtomicMin(int* p, int v) {
  std::atomic_ref<int> a(*p);
  int old = a.load();
  while (v < old && !a.compare_exchange_weak(old, v)) {
  }
}
inline float ToFloat(float v) { return v; }
inline float ToFloat(Half v) { return static_cast<float>(v.v); }
inline float ToFloat(BFloat16 v) {
  const uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
template <typename T>
inline T FromFloat(float v);
template <>
inline float FromFloat<float>(float v) {
  return v;
}
template <>
inline Half FromFloat<Half>(float v) {
  return Half{static_cast<_Float16>(v)};
}
template <>
inline BFloat16 FromFloat<BFloat16>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if (v != v) return BFloat16{static_cast<uint16_t>((u >> 16) | 0x40)};
  return BFloat16{
      static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16)};
}

inline void Copy16(void* dst, const void* src) { std::memcpy(dst, src, 16); }

constexpr Error kInvalidValue = 1;
inline Error LastLaunchError() {
  const Error e = emulation::launch_error;
  emulation::launch_error = kSuccess;
  return e;
}
inline Error MemsetAsync(void* p, int value, size_t bytes, Stream) {
  std::memset(p, value, bytes);
  return kSuccess;
}
inline Error CopyAsync(void* dst, const void* src, size_t bytes, Stream) {
  std::memmove(dst, src, bytes);
  return kSuccess;
}

}  // namespace gpu
}  // namespace tf_lora

#define threadIdx (::tf_lora::gpu::emulation::thread_idx)
#define blockIdx (::tf_lora::gpu::emulation::block_idx)
#define blockDim (::tf_lora::gpu::emulation::block_dim)
#define gridDim (::tf_lora::gpu::emulation::grid_dim)
#define TF_LORA_LAUNCH(kernel, grid, block, stream, ...) \
  ::tf_lora::gpu::emulation::Launch((grid), (block),     \
                                    [&] { kernel(__VA_ARGS__); })

#endif  // __CUDACC__

#endif  // TF_LORA_CORE_KERNELS_GPU_PORTABILITY_H_
