// LoRA op family: CPU functors.
//
// Plain C++ over raw pointers plus Eigen's ThreadPoolDevice for threading, so
// lora_cpu_test.cc can test it without an OpKernel. The vector code
// (lora_cpu_simd.inc, 256-bit GCC vector extensions) is compiled twice: for
// AVX2+FMA+F16C, picked at run time when the CPU has them, and for the baseline
// ISA, so the wheel needs no more of the CPU than TensorFlow itself does.

#define EIGEN_USE_THREADS

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "core/kernels/lora.h"
#include "unsupported/Eigen/CXX11/Tensor"

#define TF_LORA_ALWAYS_INLINE inline __attribute__((always_inline))

namespace tf_lora {
namespace functor {
namespace {

// half and bfloat16 accumulate in float32; float in float32; double in double.
template <typename T>
struct Accum {
  using type = float;
};
template <>
struct Accum<double> {
  using type = double;
};

// Rows per parallel block (each ISA's register tile divides it).
constexpr int kRows = 4;

template <typename T>
struct MergeArgs {
  using Acc = typename Accum<T>::type;
  static constexpr int64_t kTile =
      64 / sizeof(Acc);  // columns per register tile: 64 bytes

  int64_t in, out, r;
  const T* w;
  const T* a;
  // b packed tile-major, [ceil(out / kTile), r, kTile], in the accumulation
  // type and zero-padded past `out`. Walking b down a column directly would
  // step `out` elements per k: at out = 4096 every row of b lands in the same
  // L1 set and thrashes it; packed, a tile's r rows are contiguous.
  const Acc* packed_b;
  int64_t panel_tiles;  // tiles per column panel: r * panel stays in L2 while
                        // row blocks sweep it
  Acc scale;
  T* merged;
};

template <typename T>
void PackB(const T* b, int64_t r, int64_t out,
           typename Accum<T>::type* packed) {
  using Acc = typename Accum<T>::type;
  constexpr int64_t kTile = MergeArgs<T>::kTile;
  const int64_t tiles = (out + kTile - 1) / kTile;
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t j0 = t * kTile, width = std::min(kTile, out - j0);
    for (int64_t k = 0; k < r; ++k) {
      Acc* dst = packed + (t * r + k) * kTile;
      for (int64_t c = 0; c < width; ++c)
        dst[c] = static_cast<Acc>(b[k * out + j0 + c]);
      for (int64_t c = width; c < kTile; ++c) dst[c] = Acc(0);
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#define TF_LORA_SIMD_AVX2 1
#include "core/kernels/lora_cpu_simd.inc"
#undef TF_LORA_SIMD_AVX2
}  // namespace avx2
#pragma GCC pop_options

// TF_LORA_CPU_ISA=baseline forces the baseline code (to test it, or to
// compare), like oneDNN's ONEDNN_MAX_CPU_ISA.
bool UseAvx2() {
  static const bool use = [] {
    const char* isa = std::getenv("TF_LORA_CPU_ISA");
    if (isa != nullptr && std::strcmp(isa, "baseline") == 0) return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  }();
  return use;
}
#endif

namespace baseline {
#define TF_LORA_SIMD_AVX2 0
#include "core/kernels/lora_cpu_simd.inc"
#undef TF_LORA_SIMD_AVX2
}  // namespace baseline

}  // namespace

template <typename T>
void LoraMerge<Eigen::ThreadPoolDevice, T>::operator()(
    const Eigen::ThreadPoolDevice& d, int64_t in, int64_t out, int64_t r,
    const T* w, const T* a, const T* b, T scale, T* merged) const {
  using Acc = typename Accum<T>::type;
  constexpr int64_t kTile = MergeArgs<T>::kTile;
  constexpr int64_t kPanelBytes =
      128 << 10;  // of packed b, with room in L2 for rows of w
  if (in == 0 || out == 0) return;
  const int64_t tiles = (out + kTile - 1) / kTile;
  std::vector<Acc> packed_b(
      tiles * r * kTile);  // [r, out] rounded up to tiles: small beside w
  PackB(b, r, out, packed_b.data());
  const int64_t panel_tiles = std::max<int64_t>(
      1, kPanelBytes / (std::max<int64_t>(r, 1) * kTile * sizeof(Acc)));
  const MergeArgs<T> p{in,          out,
                       r,           w,
                       a,           packed_b.data(),
                       panel_tiles, static_cast<Acc>(scale),
                       merged};

  auto* rows = &baseline::MergeRowBlocks<T>;
#if defined(__x86_64__) && defined(__GNUC__)
  if (UseAvx2()) rows = &avx2::MergeRowBlocks<T>;
#endif
  const int64_t blocks = (in + kRows - 1) / kRows;
  const double row_bytes = static_cast<double>(out * sizeof(T));
  const Eigen::TensorOpCost cost(kRows * (row_bytes + r * sizeof(T)),
                                 kRows * row_bytes,
                                 kRows * static_cast<double>(out) * r);
  d.parallelFor(blocks, cost, [&p, rows](Eigen::Index begin, Eigen::Index end) {
    rows(p, begin, end);
  });
}

template struct LoraMerge<Eigen::ThreadPoolDevice, float>;
template struct LoraMerge<Eigen::ThreadPoolDevice, double>;
template struct LoraMerge<Eigen::ThreadPoolDevice, Eigen::half>;
template struct LoraMerge<Eigen::ThreadPoolDevice, Eigen::bfloat16>;

}  // namespace functor
}  // namespace tf_lora
