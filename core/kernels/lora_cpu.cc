// LoRA op family: CPU functors.
//
// Plain C++ over raw pointers plus Eigen's ThreadPoolDevice for threading, so lora_cpu_test.cc can test
// it without an OpKernel. Hot loops use GCC vector extensions (256-bit); on x86-64 an AVX2+FMA clone is
// picked at run time when the CPU has it, and the baseline-ISA build of the same code runs elsewhere, so
// the wheel needs no more than TensorFlow itself does.

#define EIGEN_USE_THREADS

#include <cstring>
#include <type_traits>
#include <vector>

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

template <typename Acc>
struct Simd;
template <>
struct Simd<float> {
  typedef float Vec __attribute__((vector_size(32)));
  static constexpr int kLanes = 8;
};
template <>
struct Simd<double> {
  typedef double Vec __attribute__((vector_size(32)));
  static constexpr int kLanes = 4;
};

// Loads kLanes elements of T (any alignment) as a vector of Acc.
template <typename Acc, typename T>
TF_LORA_ALWAYS_INLINE typename Simd<Acc>::Vec LoadVec(const T* p) {
  typename Simd<Acc>::Vec v;
  if constexpr (std::is_same_v<T, Acc>) {
    std::memcpy(&v, p, sizeof(v));
  } else {
    Acc tmp[Simd<Acc>::kLanes];
    for (int l = 0; l < Simd<Acc>::kLanes; ++l) tmp[l] = static_cast<Acc>(p[l]);
    std::memcpy(&v, tmp, sizeof(v));
  }
  return v;
}

template <typename Acc, typename T>
TF_LORA_ALWAYS_INLINE void StoreVec(T* p, typename Simd<Acc>::Vec v) {
  if constexpr (std::is_same_v<T, Acc>) {
    std::memcpy(p, &v, sizeof(v));
  } else {
    Acc tmp[Simd<Acc>::kLanes];
    std::memcpy(tmp, &v, sizeof(v));
    for (int l = 0; l < Simd<Acc>::kLanes; ++l) p[l] = static_cast<T>(tmp[l]);
  }
}

template <typename T>
struct MergeArgs {
  using Acc = typename Accum<T>::type;
  int64_t in, out, r;
  const T* w;
  const T* a;
  const Acc* b;  // [r, out], already in the accumulation type.
  Acc scale;
  T* merged;
};

// Register tile: kRows rows x kVecs vectors of columns. 4 x 2 keeps 8 accumulators, 2 rows of b and a
// broadcast in 11 of the 16 AVX2 registers, and each b vector loaded serves 4 rows.
constexpr int kRows = 4;
constexpr int kVecs = 2;

// merged[i .. i+R, :] from sa = scale * a[i .. i+R, :] (R x r, row-major).
template <int R, typename T>
TF_LORA_ALWAYS_INLINE void MergeRowBlock(const MergeArgs<T>& p, int64_t i,
                                         const typename MergeArgs<T>::Acc* sa) {
  using Acc = typename MergeArgs<T>::Acc;
  using Vec = typename Simd<Acc>::Vec;
  constexpr int L = Simd<Acc>::kLanes;
  constexpr int64_t kTile = kVecs * L;
  const int64_t out = p.out, r = p.r;
  int64_t j = 0;
  for (; j + kTile <= out; j += kTile) {
    Vec acc[R][kVecs];
    for (int rr = 0; rr < R; ++rr) {
      for (int v = 0; v < kVecs; ++v) acc[rr][v] = LoadVec<Acc>(p.w + (i + rr) * out + j + v * L);
    }
    const Acc* bk = p.b + j;
    for (int64_t k = 0; k < r; ++k, bk += out) {
      Vec bv[kVecs];
      for (int v = 0; v < kVecs; ++v) bv[v] = LoadVec<Acc>(bk + v * L);
      for (int rr = 0; rr < R; ++rr) {
        const Acc s = sa[rr * r + k];
        for (int v = 0; v < kVecs; ++v) acc[rr][v] += s * bv[v];
      }
    }
    for (int rr = 0; rr < R; ++rr) {
      for (int v = 0; v < kVecs; ++v) StoreVec<Acc>(p.merged + (i + rr) * out + j + v * L, acc[rr][v]);
    }
  }
  for (; j < out; ++j) {  // Column tail, narrower than a tile.
    for (int rr = 0; rr < R; ++rr) {
      Acc acc = static_cast<Acc>(p.w[(i + rr) * out + j]);
      for (int64_t k = 0; k < r; ++k) acc += sa[rr * r + k] * p.b[k * out + j];
      p.merged[(i + rr) * out + j] = static_cast<T>(acc);
    }
  }
}

// Row blocks [block_begin, block_end) of kRows rows each; the last block may be short.
template <typename T>
TF_LORA_ALWAYS_INLINE void MergeRowBlocks(const MergeArgs<T>& p, int64_t block_begin,
                                          int64_t block_end) {
  using Acc = typename MergeArgs<T>::Acc;
  std::vector<Acc> sa(kRows * p.r);
  for (int64_t blk = block_begin; blk < block_end; ++blk) {
    const int64_t i = blk * kRows;
    const int64_t rows = std::min<int64_t>(kRows, p.in - i);
    for (int64_t rr = 0; rr < rows; ++rr) {
      for (int64_t k = 0; k < p.r; ++k) {
        sa[rr * p.r + k] = p.scale * static_cast<Acc>(p.a[(i + rr) * p.r + k]);
      }
    }
    if (rows == kRows) {
      MergeRowBlock<kRows>(p, i, sa.data());
    } else {
      for (int64_t rr = 0; rr < rows; ++rr) MergeRowBlock<1>(p, i + rr, sa.data() + rr * p.r);
    }
  }
}

template <typename T>
void MergeRowBlocksBaseline(const MergeArgs<T>& p, int64_t begin, int64_t end) {
  MergeRowBlocks(p, begin, end);
}

#if defined(__x86_64__) && defined(__GNUC__)
template <typename T>
__attribute__((target("avx2,fma"))) void MergeRowBlocksAvx2(const MergeArgs<T>& p, int64_t begin,
                                                            int64_t end) {
  MergeRowBlocks(p, begin, end);
}

bool CpuHasAvx2Fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#endif

}  // namespace

template <typename T>
void LoraMerge<Eigen::ThreadPoolDevice, T>::operator()(const Eigen::ThreadPoolDevice& d,
                                                       int64_t in, int64_t out, int64_t r,
                                                       const T* w, const T* a, const T* b, T scale,
                                                       T* merged) const {
  using Acc = typename Accum<T>::type;
  if (in == 0 || out == 0) return;
  MergeArgs<T> p{in, out, r, w, a, nullptr, static_cast<Acc>(scale), merged};
  std::vector<Acc> b_acc;  // [r, out]: b in the accumulation type when T is a half type.
  if constexpr (std::is_same_v<T, Acc>) {
    p.b = b;
  } else {
    b_acc.resize(r * out);
    for (int64_t e = 0; e < r * out; ++e) b_acc[e] = static_cast<Acc>(b[e]);
    p.b = b_acc.data();
  }

  auto* rows = &MergeRowBlocksBaseline<T>;
#if defined(__x86_64__) && defined(__GNUC__)
  if (CpuHasAvx2Fma()) rows = &MergeRowBlocksAvx2<T>;
#endif
  const int64_t blocks = (in + kRows - 1) / kRows;
  const double row_bytes = static_cast<double>(out * sizeof(T));
  const Eigen::TensorOpCost cost(kRows * (row_bytes + r * sizeof(T)), kRows * row_bytes,
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
