// LoRA op family: CPU functors.
//
// Plain C++ over raw pointers plus Eigen's ThreadPoolDevice for threading, so lora_cpu_test.cc can test
// it without an OpKernel. Hot loops use GCC vector extensions (256-bit); on x86-64 an AVX2+FMA clone is
// picked at run time when the CPU has it, and the baseline-ISA build of the same code runs elsewhere, so
// the wheel needs no more than TensorFlow itself does.

#define EIGEN_USE_THREADS

#include <algorithm>
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

// Register tile: kRows rows x kVecs vectors of columns. 4 x 2 keeps 8 accumulators, 2 vectors of b and a
// broadcast in 11 of the 16 AVX2 registers, and each vector of b loaded serves 4 rows.
constexpr int kRows = 4;
constexpr int kVecs = 2;

template <typename T>
struct MergeArgs {
  using Acc = typename Accum<T>::type;
  static constexpr int64_t kTile = kVecs * Simd<Acc>::kLanes;  // columns per register tile

  int64_t in, out, r;
  const T* w;
  const T* a;
  // b packed tile-major, [ceil(out / kTile), r, kTile], in the accumulation type and zero-padded past
  // `out`. Walking b down a column directly would step `out` elements per k: at out = 4096 every row of
  // b lands in the same L1 set and thrashes it; packed, a tile's r rows are contiguous.
  const Acc* packed_b;
  int64_t panel_tiles;  // tiles per column panel: r * panel stays in L2 while row blocks sweep it
  Acc scale;
  T* merged;
};

template <typename T>
void PackB(const T* b, int64_t r, int64_t out, typename Accum<T>::type* packed) {
  using Acc = typename Accum<T>::type;
  constexpr int64_t kTile = MergeArgs<T>::kTile;
  const int64_t tiles = (out + kTile - 1) / kTile;
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t j0 = t * kTile, width = std::min(kTile, out - j0);
    for (int64_t k = 0; k < r; ++k) {
      Acc* dst = packed + (t * r + k) * kTile;
      for (int64_t c = 0; c < width; ++c) dst[c] = static_cast<Acc>(b[k * out + j0 + c]);
      for (int64_t c = width; c < kTile; ++c) dst[c] = Acc(0);
    }
  }
}

// merged[i .. i+R, tile t] from sa = scale * a[i .. i+R, :] (R x r, row-major). A tile cut short by the
// end of the row goes through a zero-padded copy, so every tile runs the same vector code.
template <int R, typename T>
TF_LORA_ALWAYS_INLINE void MergeTile(const MergeArgs<T>& p, int64_t i, int64_t t,
                                     const typename MergeArgs<T>::Acc* sa) {
  using Acc = typename MergeArgs<T>::Acc;
  using Vec = typename Simd<Acc>::Vec;
  constexpr int L = Simd<Acc>::kLanes;
  constexpr int64_t kTile = MergeArgs<T>::kTile;
  const int64_t out = p.out, r = p.r, j0 = t * kTile, width = std::min(kTile, out - j0);
  const bool full = width == kTile;

  Vec acc[R][kVecs];
#pragma GCC unroll 8
  for (int rr = 0; rr < R; ++rr) {
    const T* w_row = p.w + (i + rr) * out + j0;
    if (full) {
#pragma GCC unroll 4
      for (int v = 0; v < kVecs; ++v) acc[rr][v] = LoadVec<Acc>(w_row + v * L);
    } else {
      Acc pad[kTile] = {};
      for (int64_t c = 0; c < width; ++c) pad[c] = static_cast<Acc>(w_row[c]);
      for (int v = 0; v < kVecs; ++v) acc[rr][v] = LoadVec<Acc>(pad + v * L);
    }
  }
  const Acc* bk = p.packed_b + t * r * kTile;
  for (int64_t k = 0; k < r; ++k, bk += kTile) {
    Vec bv[kVecs];
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) bv[v] = LoadVec<Acc>(bk + v * L);
#pragma GCC unroll 8
    for (int rr = 0; rr < R; ++rr) {
      const Acc s = sa[rr * r + k];
#pragma GCC unroll 4
      for (int v = 0; v < kVecs; ++v) acc[rr][v] += s * bv[v];
    }
  }
#pragma GCC unroll 8
  for (int rr = 0; rr < R; ++rr) {
    T* m_row = p.merged + (i + rr) * out + j0;
    if (full) {
#pragma GCC unroll 4
      for (int v = 0; v < kVecs; ++v) StoreVec<Acc>(m_row + v * L, acc[rr][v]);
    } else {
      Acc pad[kTile];
      for (int v = 0; v < kVecs; ++v) StoreVec<Acc>(pad + v * L, acc[rr][v]);
      for (int64_t c = 0; c < width; ++c) m_row[c] = static_cast<T>(pad[c]);
    }
  }
}

// Row blocks [block_begin, block_end) of kRows rows each (the last block of the matrix may be short),
// one L2-sized column panel of packed b at a time.
template <typename T>
TF_LORA_ALWAYS_INLINE void MergeRowBlocks(const MergeArgs<T>& p, int64_t block_begin,
                                          int64_t block_end) {
  using Acc = typename MergeArgs<T>::Acc;
  constexpr int64_t kTile = MergeArgs<T>::kTile;
  const int64_t tiles = (p.out + kTile - 1) / kTile;
  std::vector<Acc> sa(kRows * p.r);
  for (int64_t t0 = 0; t0 < tiles; t0 += p.panel_tiles) {
    const int64_t t1 = std::min(tiles, t0 + p.panel_tiles);
    for (int64_t blk = block_begin; blk < block_end; ++blk) {
      const int64_t i = blk * kRows;
      const int64_t rows = std::min<int64_t>(kRows, p.in - i);
      for (int64_t rr = 0; rr < rows; ++rr) {
        for (int64_t k = 0; k < p.r; ++k) {
          sa[rr * p.r + k] = p.scale * static_cast<Acc>(p.a[(i + rr) * p.r + k]);
        }
      }
      for (int64_t t = t0; t < t1; ++t) {
        if (rows == kRows) {
          MergeTile<kRows>(p, i, t, sa.data());
        } else {
          for (int64_t rr = 0; rr < rows; ++rr) MergeTile<1>(p, i + rr, t, sa.data() + rr * p.r);
        }
      }
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
  constexpr int64_t kTile = MergeArgs<T>::kTile;
  constexpr int64_t kPanelBytes = 128 << 10;  // of packed b, with room in L2 for rows of w
  if (in == 0 || out == 0) return;
  const int64_t tiles = (out + kTile - 1) / kTile;
  std::vector<Acc> packed_b(tiles * r * kTile);  // [r, out] rounded up to tiles: small beside w
  PackB(b, r, out, packed_b.data());
  const int64_t panel_tiles =
      std::max<int64_t>(1, kPanelBytes / (std::max<int64_t>(r, 1) * kTile * sizeof(Acc)));
  const MergeArgs<T> p{in,  out, r, w, a, packed_b.data(), panel_tiles, static_cast<Acc>(scale),
                       merged};

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
