// LoRA GPU kernels and their launchers (lora_gpu.h says what and why).
// Compiled by nvcc for the GPU; compiled as C++ it runs on the CPU emulation
// of gpu_portability.h, which tests the index arithmetic without a GPU.

#include "core/kernels/lora_gpu.h"

#include <algorithm>
#include <climits>
#include <type_traits>

namespace tf_lora {
namespace gpu {
namespace {

constexpr int kTileRows = 32;        // rows per tile (one adapter per tile)
constexpr int kShrinkCols = 64;      // columns of x @ a per shrink block
constexpr int kShrinkK = 64;         // `in` per shared-memory step
constexpr int kShrinkThreads = 256;  // 16 x 16, each 2 rows x 4 columns
constexpr int kExpandK = 32;         // r per shared-memory step
constexpr int kExpandRows = 8;       // blockDim.y of the expand kernel
constexpr int kRowsPerThread = kTileRows / kExpandRows;
constexpr int kTargetBlocks = 512;  // shrink blocks worth splitting `in` for

template <typename I>
TF_LORA_DEVICE I Min(I a, I b) {
  return a < b ? a : b;
}

inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

enum class Mode { kUniform, kPerRow, kGrouped };

// Which rows a tile (a block's blockIdx.x) covers, and its adapter.
struct TileMap {
  Mode mode;
  int64_t rows;
  int tile_rows;
  int adapters;
  const int32_t* ids;      // kPerRow: each row's adapter
  const int* order;        // kGrouped: rows sorted by adapter
  const int* seg_start;    // kGrouped: [buckets + 1] first position of each
  const int* tile_prefix;  // kGrouped: [buckets + 1] first tile of each
  int buckets;             // kGrouped: adapters + 1 (the last: -1, bad ids)
};

// adapter -1: the tile's rows stay as they are.
struct Tile {
  int adapter;
  int64_t first;
  int count;
};

TF_LORA_DEVICE Tile FindTile(const TileMap& m, int64_t tile) {
  Tile t{-1, 0, 0};
  if (m.mode == Mode::kUniform) {
    t.adapter = 0;
    t.first = tile * m.tile_rows;
    if (t.first < m.rows) {
      t.count = static_cast<int>(Min<int64_t>(m.tile_rows, m.rows - t.first));
    }
  } else if (m.mode == Mode::kPerRow) {
    t.first = tile;
    if (tile < m.rows) {
      t.count = 1;
      const int k = m.ids[tile];
      t.adapter = k >= 0 && k < m.adapters ? k : -1;
    }
  } else if (tile < m.tile_prefix[m.buckets]) {
    int lo = 0, hi = m.buckets - 1;  // the last bucket whose first tile <= tile
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (m.tile_prefix[mid] <= tile) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    t.adapter = lo < m.adapters ? lo : -1;
    t.first = m.seg_start[lo] + (tile - m.tile_prefix[lo]) * m.tile_rows;
    t.count = static_cast<int>(
        Min<int64_t>(m.tile_rows, m.seg_start[lo + 1] - t.first));
  }
  return t;
}

TF_LORA_DEVICE int64_t RowOf(const TileMap& m, const Tile& t, int i) {
  return m.mode == Mode::kGrouped ? m.order[t.first + i] : t.first + i;
}

// partial[split][row][c0 + c] = x[row, split's range of in] @ a[.., c0 + c]
// for the tile's rows: blockIdx.x the tile, blockIdx.y the split of `in`,
// blockIdx.z the 64 columns of r. kTransposedA: a is stored [r, in] (the
// gradient's g @ b^T, with b [r, out]).
template <typename T, bool kTransposedA>
TF_LORA_GLOBAL void Shrink(TileMap m, const T* x, int64_t in, const T* a,
                           int64_t r, int64_t split_len, float* partial) {
  TF_LORA_SHARED float xs[kTileRows][kShrinkK + 1];
  TF_LORA_SHARED float as[kShrinkK][kShrinkCols];
  const Tile tile = FindTile(m, blockIdx.x);
  if (tile.count == 0 || tile.adapter < 0) return;
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int64_t c0 = static_cast<int64_t>(blockIdx.z) * kShrinkCols;
  const int cols = static_cast<int>(Min<int64_t>(kShrinkCols, r - c0));
  const int64_t k_begin = blockIdx.y * split_len;
  const int64_t k_end = Min<int64_t>(in, k_begin + split_len);
  const T* a_k = a + tile.adapter * in * r;
  float acc[2][4] = {};
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kShrinkK) {
    const int kc = static_cast<int>(Min<int64_t>(kShrinkK, k_end - k0));
    for (int e = tid; e < kTileRows * kShrinkK; e += kShrinkThreads) {
      const int i = e / kShrinkK, kk = e % kShrinkK;
      float v = 0.f;
      if (i < tile.count && kk < kc) {
        v = ToFloat(x[RowOf(m, tile, i) * in + k0 + kk]);
      }
      xs[i][kk] = v;
    }
    for (int e = tid; e < kShrinkK * kShrinkCols; e += kShrinkThreads) {
      const int kk = e / kShrinkCols, c = e % kShrinkCols;
      float v = 0.f;
      if (kk < kc && c < cols) {
        v = ToFloat(kTransposedA ? a_k[(c0 + c) * in + k0 + kk]
                                 : a_k[(k0 + kk) * r + c0 + c]);
      }
      as[kk][c] = v;
    }
    SyncThreads();
    for (int kk = 0; kk < kc; ++kk) {
      const float x0 = xs[ty * 2][kk], x1 = xs[ty * 2 + 1][kk];
      for (int j = 0; j < 4; ++j) {
        const float av = as[kk][tx * 4 + j];
        acc[0][j] += x0 * av;
        acc[1][j] += x1 * av;
      }
    }
    SyncThreads();
  }
  for (int q = 0; q < 2; ++q) {
    const int i = ty * 2 + q;
    if (i >= tile.count) continue;
    float* p =
        partial + (blockIdx.y * m.rows + RowOf(m, tile, i)) * r + c0 + tx * 4;
    for (int j = 0; j < 4; ++j) {
      if (tx * 4 + j < cols) p[j] = acc[q][j];
    }
  }
}

// y_out[row, cols] = y[row, cols] + (scale * s[row, :]) @ b[:, cols] for the
// tile's rows: blockIdx.x the tile, blockIdx.y 32 * V columns. s is the sum of
// the shrink's partials (`partial`, `splits` of them) or a matrix [rows, r]
// (`s_matrix`: a for merge, g @ b^T for the gradient's dx). y null: zero.
// kTransposedB: b is stored [out, r] (dx = (g b^T) a^T, with a [in, r]).
// Tiles without an adapter copy their rows; in per-row mode they also report a
// bad id. xa_out (with `partial`; may be null): the first column block of each
// tile writes the summed partials, x @ a, there ([rows, r]).
template <typename T, typename S, int V, bool kTransposedB>
TF_LORA_GLOBAL void Expand(TileMap m, const T* y, T* y_out, int64_t out,
                           int64_t r, const S* s_matrix, const float* partial,
                           int splits, const T* b, const T* scales, float scale,
                           int* bad_row, T* xa_out) {
  constexpr int kCols = 32 * V;
  TF_LORA_SHARED float ss[kTileRows][kExpandK + 1];
  TF_LORA_SHARED float bs[kExpandK][kCols];
  const Tile tile = FindTile(m, blockIdx.x);
  if (tile.count == 0) return;
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * 32 + tx;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kCols;
  if (tile.adapter < 0) {
    if (m.mode == Mode::kPerRow && tid == 0 && blockIdx.y == 0 &&
        m.ids[tile.first] != -1) {
      AtomicMin(bad_row, static_cast<int>(tile.first));
    }
    if (y == y_out) return;
    for (int i = ty; i < tile.count; i += kExpandRows) {
      const int64_t row = RowOf(m, tile, i);
      for (int c = tx; c < kCols && col0 + c < out; c += 32) {
        const int64_t at = row * out + col0 + c;
        y_out[at] = y != nullptr ? y[at] : FromFloat<T>(0.f);
      }
    }
    return;
  }
  const float a_scale =
      scales != nullptr ? ToFloat(scales[tile.adapter]) : scale;
  const T* b_k = b + tile.adapter * r * out;
  float acc[kRowsPerThread][V] = {};
  for (int64_t k0 = 0; k0 < r; k0 += kExpandK) {
    const int kc = static_cast<int>(Min<int64_t>(kExpandK, r - k0));
    for (int e = tid; e < kTileRows * kExpandK; e += 32 * kExpandRows) {
      const int i = e / kExpandK, k = e % kExpandK;
      float v = 0.f;
      if (i < tile.count && k < kc) {
        const int64_t row = RowOf(m, tile, i);
        if (partial != nullptr) {
          for (int s = 0; s < splits; ++s) {
            v += partial[(s * m.rows + row) * r + k0 + k];
          }
          if (xa_out != nullptr && blockIdx.y == 0) {
            xa_out[row * r + k0 + k] = FromFloat<T>(v);
          }
        } else {
          v = ToFloat(s_matrix[row * r + k0 + k]);
        }
        v *= a_scale;
      }
      ss[i][k] = v;
    }
    for (int e = tid; e < kExpandK * kCols; e += 32 * kExpandRows) {
      const int k = e / kCols, c = e % kCols;
      float v = 0.f;
      if (k < kc && col0 + c < out) {
        v = ToFloat(kTransposedB ? b_k[(col0 + c) * r + k0 + k]
                                 : b_k[(k0 + k) * out + col0 + c]);
      }
      bs[k][c] = v;
    }
    SyncThreads();
    for (int k = 0; k < kc; ++k) {
      float bv[V];
      for (int v = 0; v < V; ++v) bv[v] = bs[k][tx * V + v];
      for (int q = 0; q < kRowsPerThread; ++q) {
        const float s = ss[ty + kExpandRows * q][k];
        for (int v = 0; v < V; ++v) acc[q][v] += s * bv[v];
      }
    }
    SyncThreads();
  }
  const int64_t c = col0 + tx * V;
  for (int q = 0; q < kRowsPerThread; ++q) {
    const int i = ty + kExpandRows * q;
    if (i >= tile.count) continue;
    const int64_t at = RowOf(m, tile, i) * out + c;
    if (V > 1 && c + V <= out) {  // whole, 16-byte aligned (the launcher's V)
      alignas(16) T vals[V];
      if (y != nullptr) {
        Copy16(vals, y + at);
      } else {
        for (int v = 0; v < V; ++v) vals[v] = FromFloat<T>(0.f);
      }
      for (int v = 0; v < V; ++v) {
        vals[v] = FromFloat<T>(ToFloat(vals[v]) + acc[q][v]);
      }
      Copy16(y_out + at, vals);
    } else {
      for (int v = 0; v < V && c + v < out; ++v) {
        const float base = y != nullptr ? ToFloat(y[at + v]) : 0.f;
        y_out[at + v] = FromFloat<T>(base + acc[q][v]);
      }
    }
  }
}

// -- the gradient's reductions over rows
// ----------------------------------------

constexpr int kReduceCols = 64;  // of x's columns (and of r) per block
constexpr int kReduceRows = 32;  // rows per shared-memory step

// Sums over rows n of x[n, i] * g[n, k], for [cols, r]: x [rows, cols] of T,
// g [rows, r] of float; blockIdx.x 64 of x's columns, blockIdx.z 64 of r.
// - Splits (seg_start null): blockIdx.y is a split of the rows, written to
//   partial[split][i][k] (LoraApplyGrad's da and db^T, summed by FinishReduce).
// - Segments: blockIdx.y is adapter k - seg_base (a launch covers at most
//   max_grid_yz adapters), its rows order[seg_start[k] .. seg_start[k + 1]);
//   the result, times scales[k], goes to out[k] as is or transposed
//   ([r, cols]) (BatchedLoraApplyGrad's da and db).
template <typename T>
TF_LORA_GLOBAL void ReduceRows(int64_t rows, int64_t cols, int64_t r,
                               const T* x, const float* g, int64_t split_len,
                               float* partial, const int* order,
                               const int* seg_start, const T* scales,
                               bool transposed, T* out, int64_t seg_base) {
  TF_LORA_SHARED float xs[kReduceRows][kReduceCols + 1];
  TF_LORA_SHARED float gs[kReduceRows][kReduceCols + 1];
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kReduceCols;
  const int64_t k0 = static_cast<int64_t>(blockIdx.z) * kReduceCols;
  int64_t n_begin, n_end;
  const int64_t adapter = seg_base + blockIdx.y;  // segments mode
  if (seg_start != nullptr) {
    n_begin = seg_start[adapter];
    n_end = seg_start[adapter + 1];
  } else {
    n_begin = blockIdx.y * split_len;
    n_end = Min<int64_t>(rows, n_begin + split_len);
  }
  float acc[4][4] = {};
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kReduceRows) {
    const int nc = static_cast<int>(Min<int64_t>(kReduceRows, n_end - n0));
    for (int e = tid; e < kReduceRows * kReduceCols; e += kShrinkThreads) {
      const int n = e / kReduceCols, c = e % kReduceCols;
      float xv = 0.f, gv = 0.f;
      if (n < nc) {
        const int64_t row = order != nullptr ? order[n0 + n] : n0 + n;
        if (i0 + c < cols) xv = ToFloat(x[row * cols + i0 + c]);
        if (k0 + c < r) gv = g[row * r + k0 + c];
      }
      xs[n][c] = xv;
      gs[n][c] = gv;
    }
    SyncThreads();
    for (int n = 0; n < nc; ++n) {
      float xv[4], gv[4];
      for (int j = 0; j < 4; ++j) {
        xv[j] = xs[n][ty * 4 + j];
        gv[j] = gs[n][tx * 4 + j];
      }
      for (int p = 0; p < 4; ++p) {
        for (int q = 0; q < 4; ++q) acc[p][q] += xv[p] * gv[q];
      }
    }
    SyncThreads();
  }
  const float scale = scales != nullptr ? ToFloat(scales[adapter]) : 1.f;
  for (int p = 0; p < 4; ++p) {
    const int64_t i = i0 + ty * 4 + p;
    if (i >= cols) continue;
    for (int q = 0; q < 4; ++q) {
      const int64_t c = k0 + tx * 4 + q;
      if (c >= r) continue;
      if (out == nullptr) {
        partial[(blockIdx.y * cols + i) * r + c] = acc[p][q];
      } else {
        out[adapter * cols * r + (transposed ? c * cols + i : i * r + c)] =
            FromFloat<T>(scale * acc[p][q]);
      }
    }
  }
}

// out = scale * (sum of the splits' partials) [cols, r], stored as is or
// transposed ([r, cols]).
template <typename T>
TF_LORA_GLOBAL void FinishReduce(int64_t cols, int64_t r, int splits,
                                 const float* partial, float scale,
                                 bool transposed, T* out) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= cols * r) return;
  float v = 0.f;
  for (int s = 0; s < splits; ++s) v += partial[s * cols * r + e];
  const int64_t i = e / r, k = e % r;
  out[transposed ? k * cols + i : e] = FromFloat<T>(scale * v);
}

// dense[e] = sum of the splits' partials (the shrink's x @ a), [rows * r],
// as D (float, or T for an output).
template <typename D>
TF_LORA_GLOBAL void SumSplits(int64_t size, int splits, const float* partial,
                              D* dense) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= size) return;
  float v = 0.f;
  for (int s = 0; s < splits; ++s) v += partial[s * size + e];
  dense[e] = FromFloat<D>(v);
}

// u[row, k] = scales[a] * gb[row, k] + grad_xa[row, k] with a = ids[row]
// (0 for rows without an adapter): the batched gradient's dx and da factor
// when BatchedLoraApply's x @ a has a gradient of its own.
template <typename T>
TF_LORA_GLOBAL void CombineRows(int64_t n, int64_t r, const int32_t* ids,
                                int adapters, const T* scales, const float* gb,
                                const T* grad_xa, float* u) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= n * r) return;
  const int a = ids[e / r];
  u[e] = a >= 0 && a < adapters
             ? ToFloat(scales[a]) * gb[e] + ToFloat(grad_xa[e])
             : 0.f;
}

// u[e] = scale * gb[e] + grad_xa[e]: what dx and da multiply when
// LoraApply's x @ a has a gradient of its own.
template <typename T>
TF_LORA_GLOBAL void Combine(int64_t size, const float* gb, float scale,
                            const T* grad_xa, float* u) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= size) return;
  u[e] = scale * gb[e] + ToFloat(grad_xa[e]);
}

// *out = sum of p[e] * q[e] (dscale = sum of (x a) * (g b^T)): one block,
// a fixed order, so the result does not depend on timing.
template <typename T>
TF_LORA_GLOBAL void Dot(int64_t size, const float* p, const float* q, T* out) {
  constexpr int kThreads = 256;
  TF_LORA_SHARED float sums[kThreads];
  const int tid = threadIdx.x;
  float v = 0.f;
  for (int64_t e = tid; e < size; e += kThreads) v += p[e] * q[e];
  sums[tid] = v;
  SyncThreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (tid < half) sums[tid] += sums[tid + half];
    SyncThreads();
  }
  if (tid == 0) *out = FromFloat<T>(sums[0]);
}

// out[k] = sum over adapter k's rows of p[row, :] . q[row, :] (the batched
// gradient's dscales): one block per adapter, a fixed order.
template <typename T>
TF_LORA_GLOBAL void SegmentDots(int64_t r, const int* order,
                                const int* seg_start, const float* p,
                                const float* q, T* out) {
  constexpr int kThreads = 256;
  TF_LORA_SHARED float sums[kThreads];
  const int tid = threadIdx.x, adapter = blockIdx.x;
  const int64_t begin = seg_start[adapter], end = seg_start[adapter + 1];
  float v = 0.f;
  for (int64_t e = begin * r + tid; e < end * r; e += kThreads) {
    const int64_t at = order[e / r] * r + e % r;
    v += p[at] * q[at];
  }
  sums[tid] = v;
  SyncThreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (tid < half) sums[tid] += sums[tid + half];
    SyncThreads();
  }
  if (tid == 0) out[adapter] = FromFloat<T>(sums[0]);
}

// -- grouping rows by adapter (kGrouped) --------------------------------------

TF_LORA_GLOBAL void CountRows(int64_t n, const int32_t* ids, int adapters,
                              int* counts, int* bad_row) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  int k = ids[i];
  if (k < -1 || k >= adapters) {
    AtomicMin(bad_row, static_cast<int>(i));
    k = -1;
  }
  AtomicAdd(&counts[k < 0 ? adapters : k], 1);
}

// One thread: segments and tiles per bucket (a few thousand at most).
TF_LORA_GLOBAL void PlanSegments(int buckets, int tile_rows, const int* counts,
                                 int* seg_start, int* tile_prefix,
                                 int* cursor) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  int rows = 0, tiles = 0;
  for (int b = 0; b < buckets; ++b) {
    seg_start[b] = rows;
    tile_prefix[b] = tiles;
    rows += counts[b];
    tiles += (counts[b] + tile_rows - 1) / tile_rows;
    cursor[b] = 0;
  }
  seg_start[buckets] = rows;
  tile_prefix[buckets] = tiles;
}

// Rows land in their bucket in any order: each row's sums do not depend on
// where it sits.
TF_LORA_GLOBAL void ScatterRows(int64_t n, const int32_t* ids, int adapters,
                                const int* seg_start, int* cursor, int* order) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int k = ids[i];
  const int b = k < 0 || k >= adapters ? adapters : k;
  order[seg_start[b] + AtomicAdd(&cursor[b], 1)] = static_cast<int>(i);
}

TF_LORA_GLOBAL void CheckIds(int64_t n, const int32_t* ids, int adapters,
                             int* bad_row) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n && (ids[i] < -1 || ids[i] >= adapters)) {
    AtomicMin(bad_row, static_cast<int>(i));
  }
}

// -- launchers
// -----------------------------------------------------------------

// Splits of `in` that give the shrink about kTargetBlocks blocks, each at
// least 4 steps of kShrinkK long.
int Splits(int64_t tiles, int64_t in, int64_t r) {
  const int64_t blocks = std::max<int64_t>(1, tiles * CeilDiv(r, kShrinkCols));
  const int64_t most = std::max<int64_t>(1, CeilDiv(in, 4 * kShrinkK));
  return static_cast<int>(
      std::min(most, std::max<int64_t>(1, CeilDiv(kTargetBlocks, blocks))));
}

int64_t SplitLen(int64_t in, int splits) {
  return CeilDiv(CeilDiv(in, splits), kShrinkK) * kShrinkK;
}

size_t Align16(size_t bytes) { return (bytes + 15) / 16 * 16; }

bool Aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// The expand kernel with 16-byte accesses where every row allows them.
template <typename T, typename S = T, bool kTransposedB = false>
Error LaunchExpand(Stream stream, const TileMap& m, int64_t tiles, const T* y,
                   T* y_out, int64_t out, int64_t r, const S* s_matrix,
                   const float* partial, int splits, const T* b,
                   const T* scales, float scale, int* bad_row,
                   T* xa_out = nullptr) {
  constexpr int kVec = 16 / sizeof(T);
  const dim3 block(32, kExpandRows);
  if (out % kVec == 0 && Aligned16(y) && Aligned16(y_out)) {
    const int64_t col_tiles = CeilDiv(out, 32 * kVec);
    if (col_tiles > 65535) return kInvalidValue;
    auto* kernel = Expand<T, S, kVec, kTransposedB>;
    TF_LORA_LAUNCH(kernel, dim3(tiles, col_tiles), block, stream, m, y, y_out,
                   out, r, s_matrix, partial, splits, b, scales, scale, bad_row,
                   xa_out);
  } else {
    const int64_t col_tiles = CeilDiv(out, 32);
    if (col_tiles > 65535) return kInvalidValue;
    auto* kernel = Expand<T, S, 1, kTransposedB>;
    TF_LORA_LAUNCH(kernel, dim3(tiles, col_tiles), block, stream, m, y, y_out,
                   out, r, s_matrix, partial, splits, b, scales, scale, bad_row,
                   xa_out);
  }
  return LastLaunchError();
}

template <typename T, bool kTransposedA = false>
Error LaunchShrink(Stream stream, const TileMap& m, int64_t tiles, const T* x,
                   int64_t in, const T* a, int64_t r, int splits,
                   float* partial) {
  const int64_t col_chunks = CeilDiv(r, kShrinkCols);
  if (col_chunks > 65535) return kInvalidValue;
  auto* kernel = Shrink<T, kTransposedA>;
  TF_LORA_LAUNCH(kernel, dim3(tiles, splits, col_chunks), dim3(kShrinkThreads),
                 stream, m, x, in, a, r, SplitLen(in, splits), partial);
  return LastLaunchError();
}

template <typename T>
const T* NoMatrix() {
  return nullptr;
}

Error CopyRows(Stream stream, const void* y, void* y_out, size_t bytes) {
  return y == y_out ? kSuccess : CopyAsync(y_out, y, bytes, stream);
}

// How a batched apply runs: tiles (an upper bound in kGrouped mode), splits,
// and the workspace: grouping ints, then the partial sums.
struct BatchedPlan {
  Mode mode;
  int64_t tiles;
  int splits;
  size_t int_bytes, bytes;
};

// Grouping by adapter (kGrouped) takes this many ints of workspace: counts,
// segment starts, tile starts and cursors per bucket, then the rows.
int64_t GroupingInts(int64_t n, int64_t adapters) {
  return 4 * (adapters + 1) + 2 + n;
}

// Tiles for rows grouped by adapter, in an upper bound known on the host.
int64_t GroupedTiles(int64_t n, int64_t adapters) {
  return CeilDiv(n, kTileRows) + adapters + 1;
}

BatchedPlan PlanBatched(int64_t n, int64_t in, int64_t r, int64_t adapters) {
  BatchedPlan p;
  if (n <= kPerRowTilesUpTo) {
    p.mode = Mode::kPerRow;
    p.tiles = n;
    p.int_bytes = 0;
  } else {
    p.mode = Mode::kGrouped;
    p.tiles = GroupedTiles(n, adapters);
    p.int_bytes = Align16(sizeof(int) * GroupingInts(n, adapters));
  }
  p.splits = Splits(p.tiles, in, r);
  p.bytes = p.int_bytes + Align16(sizeof(float) * p.splits * n * r);
  return p;
}

// Groups the rows by adapter on the device (counts, one-thread plan, scatter)
// into `ints` (GroupingInts of them) and points m (kGrouped) at the result;
// bad ids go to the last bucket, reported in *bad_row.
Error GroupRows(Stream stream, int64_t n, const int32_t* ids, int adapters,
                int* ints, int* bad_row, TileMap* m) {
  const int buckets = adapters + 1;
  int* counts = ints;
  int* seg_start = counts + buckets;
  int* tile_prefix = seg_start + buckets + 1;
  int* cursor = tile_prefix + buckets + 1;
  int* order = cursor + buckets;
  const Error e = MemsetAsync(counts, 0, sizeof(int) * buckets, stream);
  if (e != kSuccess) return e;
  TF_LORA_LAUNCH(CountRows, dim3(CeilDiv(n, 256)), dim3(256), stream, n, ids,
                 adapters, counts, bad_row);
  TF_LORA_LAUNCH(PlanSegments, dim3(1), dim3(1), stream, buckets, kTileRows,
                 counts, seg_start, tile_prefix, cursor);
  TF_LORA_LAUNCH(ScatterRows, dim3(CeilDiv(n, 256)), dim3(256), stream, n, ids,
                 adapters, seg_start, cursor, order);
  *m = TileMap{Mode::kGrouped, n,         kTileRows,   adapters, ids,
               order,          seg_start, tile_prefix, buckets};
  return LastLaunchError();
}

// Carves 16-byte-aligned pieces off a workspace, in order.
struct Layout {
  size_t bytes = 0;
  size_t Take(size_t size) {
    const size_t at = bytes;
    bytes += Align16(size);
    return at;
  }
};

// The gradients' first step: x a and g b^T per row, each summed from its
// shrink's partials into [n, r] floats. Where the workspace holds them:
struct XaGbPlan {
  int xa_splits, gb_splits;
  size_t xa_parts, gb_parts, xa, gb;
};

XaGbPlan PlanXaGb(Layout* layout, int64_t tiles, int64_t n, int64_t in,
                  int64_t out, int64_t r) {
  XaGbPlan p;
  p.xa_splits = Splits(tiles, in, r);
  p.gb_splits = Splits(tiles, out, r);
  p.xa_parts = layout->Take(sizeof(float) * p.xa_splits * n * r);
  p.gb_parts = layout->Take(sizeof(float) * p.gb_splits * n * r);
  p.xa = layout->Take(sizeof(float) * n * r);
  p.gb = layout->Take(sizeof(float) * n * r);
  return p;
}

// x a (a [in, r] per adapter) and g b^T (b [r, out] per adapter) for the
// rows of m's tiles, into *xa and *gb. Grouped rows without an adapter are
// never written by the shrinks: their partials start at zero. xa_given (may
// be null): x a as (Batched)LoraApply computed it, then *xa. out = 0: g b^T
// is zero.
template <typename T>
Error ShrinkXaGb(Stream stream, const TileMap& m, int64_t tiles,
                 const XaGbPlan& p, char* base, int64_t n, int64_t in,
                 int64_t out, int64_t r, const T* x, const T* a, const T* g,
                 const T* b, float** xa, float** gb,
                 const float* xa_given = nullptr) {
  float* xa_parts = reinterpret_cast<float*>(base + p.xa_parts);
  float* gb_parts = reinterpret_cast<float*>(base + p.gb_parts);
  *xa = reinterpret_cast<float*>(base + p.xa);
  *gb = reinterpret_cast<float*>(base + p.gb);
  Error e = kSuccess;
  if (m.mode == Mode::kGrouped) {
    e = MemsetAsync(xa_parts, 0, p.xa - p.xa_parts, stream);  // both
  }
  if (e == kSuccess && xa_given == nullptr) {
    e = LaunchShrink<T>(stream, m, tiles, x, in, a, r, p.xa_splits, xa_parts);
  }
  if (e == kSuccess && out > 0) {
    e = LaunchShrink<T, true>(stream, m, tiles, g, out, b, r, p.gb_splits,
                              gb_parts);
  }
  if (e != kSuccess) return e;
  auto* sum = SumSplits<float>;
  if (xa_given != nullptr) {
    *xa = const_cast<float*>(xa_given);  // only read
  } else {
    TF_LORA_LAUNCH(sum, dim3(CeilDiv(n * r, 256)), dim3(256), stream, n * r,
                   p.xa_splits, xa_parts, *xa);
  }
  if (out == 0) {
    const Error zeroed = MemsetAsync(*gb, 0, sizeof(float) * n * r, stream);
    return zeroed != kSuccess ? zeroed : LastLaunchError();
  }
  TF_LORA_LAUNCH(sum, dim3(CeilDiv(n * r, 256)), dim3(256), stream, n * r,
                 p.gb_splits, gb_parts, *gb);
  return LastLaunchError();
}

}  // namespace

template <typename T>
Error LoraMerge(Stream stream, int64_t in, int64_t out, int64_t r, const T* w,
                const T* a, const T* b, float scale, T* result) {
  if (in == 0 || out == 0) return kSuccess;
  if (r == 0) return CopyRows(stream, w, result, sizeof(T) * in * out);
  if (in > INT_MAX) return kInvalidValue;
  const TileMap m{Mode::kUniform, in, kTileRows, 1};
  return LaunchExpand<T>(stream, m, CeilDiv(in, kTileRows), w, result, out, r,
                         a, nullptr, 0, b, nullptr, scale, nullptr);
}

size_t LoraApplyWorkspaceBytes(int64_t n, int64_t in, int64_t r) {
  return Align16(sizeof(float) * Splits(CeilDiv(n, kTileRows), in, r) * n * r);
}

template <typename T>
Error LoraApply(Stream stream, int64_t n, int64_t in, int64_t out, int64_t r,
                const T* y, const T* x, const T* a, const T* b, float scale,
                T* y_out, T* xa, void* workspace) {
  if (n == 0 || r == 0) {  // xa is empty; y_out = y
    return out == 0 ? kSuccess
                    : CopyRows(stream, y, y_out, sizeof(T) * n * out);
  }
  if (in == 0) {  // x @ a = 0
    Error e = MemsetAsync(xa, 0, sizeof(T) * n * r, stream);
    if (e != kSuccess || out == 0) return e;
    return CopyRows(stream, y, y_out, sizeof(T) * n * out);
  }
  if (n > INT_MAX) return kInvalidValue;
  const TileMap m{Mode::kUniform, n, kTileRows, 1};
  const int64_t tiles = CeilDiv(n, kTileRows);
  const int splits = Splits(tiles, in, r);
  float* partial = static_cast<float*>(workspace);
  Error e = LaunchShrink<T>(stream, m, tiles, x, in, a, r, splits, partial);
  if (e != kSuccess) return e;
  if (out == 0) {  // no expand to write xa: sum the partials into it here
    auto* sum = SumSplits<T>;
    TF_LORA_LAUNCH(sum, dim3(CeilDiv(n * r, 256)), dim3(256), stream, n * r,
                   splits, partial, xa);
    return LastLaunchError();
  }
  return LaunchExpand<T>(stream, m, tiles, y, y_out, out, r, NoMatrix<T>(),
                         partial, splits, b, nullptr, scale, nullptr, xa);
}

namespace {

// The gradient's workspace: x a and g b^T (PlanXaGb), then the row
// reductions' partials.
struct GradPlan {
  int64_t tiles;
  XaGbPlan xa_gb;
  int reduce_splits;
  size_t reduce, u, bytes;  // u: scale g b^T + grad_xa, [n, r] floats
};

GradPlan PlanGrad(int64_t n, int64_t in, int64_t out, int64_t r) {
  GradPlan p;
  Layout layout;
  p.tiles = CeilDiv(n, kTileRows);
  p.xa_gb = PlanXaGb(&layout, p.tiles, n, in, out, r);
  const int64_t col_blocks = std::max<int64_t>(
      1, CeilDiv(std::max(in, out), kReduceCols) * CeilDiv(r, kReduceCols));
  p.reduce_splits = static_cast<int>(std::min<int64_t>(
      std::max<int64_t>(1, CeilDiv(n, 4 * kReduceRows)),
      std::max<int64_t>(1, CeilDiv(kTargetBlocks, col_blocks))));
  p.reduce =
      layout.Take(sizeof(float) * p.reduce_splits * std::max(in, out) * r);
  p.u = layout.Take(sizeof(float) * n * r);
  p.bytes = layout.bytes;
  return p;
}

template <typename T>
Error ReduceInto(Stream stream, const GradPlan& p, int64_t n, int64_t cols,
                 int64_t r, const T* x, const float* g, float scale,
                 bool transposed, float* partial, T* out) {
  auto* reduce = ReduceRows<T>;
  TF_LORA_LAUNCH(
      reduce,
      dim3(CeilDiv(cols, kReduceCols), p.reduce_splits,
           CeilDiv(r, kReduceCols)),
      dim3(kShrinkThreads), stream, n, cols, r, x, g,
      CeilDiv(CeilDiv(n, p.reduce_splits), kReduceRows) * kReduceRows, partial,
      static_cast<const int*>(nullptr), static_cast<const int*>(nullptr),
      static_cast<const T*>(nullptr), false, static_cast<T*>(nullptr),
      int64_t{0});
  auto* finish = FinishReduce<T>;
  TF_LORA_LAUNCH(finish, dim3(CeilDiv(cols * r, 256)), dim3(256), stream, cols,
                 r, p.reduce_splits, partial, scale, transposed, out);
  return LastLaunchError();
}

}  // namespace

size_t LoraApplyGradWorkspaceBytes(int64_t n, int64_t in, int64_t out,
                                   int64_t r) {
  return PlanGrad(n, in, out, r).bytes;
}

template <typename T>
Error LoraApplyGrad(Stream stream, int64_t n, int64_t in, int64_t out,
                    int64_t r, const T* g, const T* x, const T* a, const T* b,
                    float scale, T* dx, T* da, T* db, T* dscale,
                    void* workspace, const T* xa, const T* grad_xa) {
  // Every product is zero; with grad_xa, dx and da are not when only `out` is.
  if (n == 0 || in == 0 || r == 0 || (out == 0 && grad_xa == nullptr)) {
    Error e = MemsetAsync(dx, 0, sizeof(T) * n * in, stream);
    if (e == kSuccess) e = MemsetAsync(da, 0, sizeof(T) * in * r, stream);
    if (e == kSuccess) e = MemsetAsync(db, 0, sizeof(T) * r * out, stream);
    if (e == kSuccess) e = MemsetAsync(dscale, 0, sizeof(T), stream);
    return e;
  }
  if (n > INT_MAX) return kInvalidValue;
  const GradPlan p = PlanGrad(n, in, out, r);
  char* base = static_cast<char*>(workspace);
  float* reduce = reinterpret_cast<float*>(base + p.reduce);
  const TileMap m{Mode::kUniform, n, kTileRows, 1};
  const float* xa_given = nullptr;
  if constexpr (std::is_same<T, float>::value) xa_given = xa;
  float *xa_f, *gb;
  Error e = ShrinkXaGb<T>(stream, m, p.tiles, p.xa_gb, base, n, in, out, r, x,
                          a, g, b, &xa_f, &gb, xa_given);
  if (e != kSuccess) return e;
  // dscale = sum (x a) * (g b^T).
  auto* dot = Dot<T>;
  TF_LORA_LAUNCH(dot, dim3(1), dim3(256), stream, n * r, xa_f, gb, dscale);
  // u = scale (g b^T) (+ grad_xa); dx = u a^T; da = x^T u [in, r].
  const float* u = gb;
  float u_scale = scale;
  if (grad_xa != nullptr) {
    float* combined = reinterpret_cast<float*>(base + p.u);
    auto* combine = Combine<T>;
    TF_LORA_LAUNCH(combine, dim3(CeilDiv(n * r, 256)), dim3(256), stream, n * r,
                   gb, scale, grad_xa, combined);
    u = combined;
    u_scale = 1.f;
  }
  e = LaunchExpand<T, float, true>(stream, m, p.tiles, nullptr, dx, in, r, u,
                                   nullptr, 0, a, nullptr, u_scale, nullptr);
  if (e != kSuccess) return e;
  e = ReduceInto<T>(stream, p, n, in, r, x, u, u_scale, false, reduce, da);
  if (e != kSuccess) return e;
  // db = scale (x a)^T g, as (g^T (x a))^T (empty for out = 0).
  if (out == 0) return kSuccess;
  return ReduceInto<T>(stream, p, n, out, r, g, xa_f, scale, true, reduce, db);
}

size_t BatchedLoraApplyWorkspaceBytes(int64_t n, int64_t in, int64_t r,
                                      int64_t adapters) {
  return PlanBatched(n, in, r, adapters).bytes;
}

template <typename T>
Error BatchedLoraApply(Stream stream, int64_t n, int64_t in, int64_t out,
                       int64_t r, int64_t adapters, const T* y, const T* x,
                       const T* a_stack, const T* b_stack, const int32_t* ids,
                       const T* scales, T* y_out, T* xa, void* workspace,
                       int* bad_row) {
  Error e = MemsetAsync(bad_row, 0x7f, sizeof(int), stream);  // kNoBadRow
  if (e != kSuccess || n == 0) return e;
  if (n > INT_MAX || adapters >= INT_MAX) return kInvalidValue;
  const int n_adapters = static_cast<int>(adapters);
  const BatchedPlan plan = PlanBatched(n, in, r, adapters);
  // x @ a_k per row: zero where no adapter adds (the kernels write the rest).
  e = MemsetAsync(xa, 0, sizeof(T) * n * r, stream);
  if (e != kSuccess) return e;
  if (r == 0 || in == 0 || n_adapters == 0) {
    // Nothing to add; the ids are still checked.
    TF_LORA_LAUNCH(CheckIds, dim3(CeilDiv(n, 256)), dim3(256), stream, n, ids,
                   n_adapters, bad_row);
    e = LastLaunchError();
    if (e != kSuccess || out == 0) return e;
    return CopyRows(stream, y, y_out, sizeof(T) * n * out);
  }
  TileMap m{Mode::kPerRow, n, 1, n_adapters, ids};
  if (plan.mode == Mode::kGrouped) {
    e = GroupRows(stream, n, ids, n_adapters, static_cast<int*>(workspace),
                  bad_row, &m);
    if (e != kSuccess) return e;
  } else if (out == 0) {  // the expand checks per-row ids; it does not run
    TF_LORA_LAUNCH(CheckIds, dim3(CeilDiv(n, 256)), dim3(256), stream, n, ids,
                   n_adapters, bad_row);
  }
  float* partial =
      reinterpret_cast<float*>(static_cast<char*>(workspace) + plan.int_bytes);
  if (out == 0) {  // rows without an adapter: partials never written
    e = MemsetAsync(partial, 0, sizeof(float) * plan.splits * n * r, stream);
    if (e != kSuccess) return e;
  }
  e = LaunchShrink<T>(stream, m, plan.tiles, x, in, a_stack, r, plan.splits,
                      partial);
  if (e != kSuccess) return e;
  if (out == 0) {  // no expand to write xa: sum the partials into it here
    auto* sum = SumSplits<T>;
    TF_LORA_LAUNCH(sum, dim3(CeilDiv(n * r, 256)), dim3(256), stream, n * r,
                   plan.splits, partial, xa);
    return LastLaunchError();
  }
  return LaunchExpand<T>(stream, m, plan.tiles, y, y_out, out, r, NoMatrix<T>(),
                         partial, plan.splits, b_stack, scales, 1.f, bad_row,
                         xa);
}

namespace {

// The batched gradient's workspace: the grouping, then x a and g b^T.
struct BatchedGradPlan {
  int64_t tiles;
  XaGbPlan xa_gb;
  size_t u, bytes;  // u: scales_k g b_k^T + grad_xa per row, [n, r] floats
};

BatchedGradPlan PlanBatchedGrad(int64_t n, int64_t in, int64_t out, int64_t r,
                                int64_t adapters) {
  BatchedGradPlan p;
  Layout layout;
  layout.Take(sizeof(int) * GroupingInts(n, adapters));
  p.tiles = GroupedTiles(n, adapters);
  p.xa_gb = PlanXaGb(&layout, p.tiles, n, in, out, r);
  p.u = layout.Take(sizeof(float) * n * r);
  p.bytes = layout.bytes;
  return p;
}

}  // namespace

size_t BatchedLoraApplyGradWorkspaceBytes(int64_t n, int64_t in, int64_t out,
                                          int64_t r, int64_t adapters) {
  return PlanBatchedGrad(n, in, out, r, adapters).bytes;
}

template <typename T>
Error BatchedLoraApplyGrad(Stream stream, int64_t n, int64_t in, int64_t out,
                           int64_t r, int64_t adapters, const T* g, const T* x,
                           const T* a_stack, const T* b_stack,
                           const int32_t* ids, const T* scales, T* dx, T* da,
                           T* db, T* dscales, void* workspace, int* bad_row,
                           const T* xa_in, const T* grad_xa) {
  Error e = MemsetAsync(bad_row, 0x7f, sizeof(int), stream);  // kNoBadRow
  if (e != kSuccess) return e;
  if (n > INT_MAX || adapters >= INT_MAX) return kInvalidValue;
  const int n_adapters = static_cast<int>(adapters);
  // With grad_xa, dx and da are not zero when only `out` is.
  if (n == 0 || in == 0 || r == 0 || n_adapters == 0 ||
      (out == 0 && grad_xa == nullptr)) {
    // Every product is zero; the ids are still checked.
    if (n > 0) {
      TF_LORA_LAUNCH(CheckIds, dim3(CeilDiv(n, 256)), dim3(256), stream, n, ids,
                     n_adapters, bad_row);
    }
    e = MemsetAsync(dx, 0, sizeof(T) * n * in, stream);
    if (e == kSuccess) {
      e = MemsetAsync(da, 0, sizeof(T) * adapters * in * r, stream);
    }
    if (e == kSuccess) {
      e = MemsetAsync(db, 0, sizeof(T) * adapters * r * out, stream);
    }
    if (e == kSuccess)
      e = MemsetAsync(dscales, 0, sizeof(T) * adapters, stream);
    return e == kSuccess ? LastLaunchError() : e;
  }
  const BatchedGradPlan p = PlanBatchedGrad(n, in, out, r, adapters);
  char* base = static_cast<char*>(workspace);
  TileMap m;
  e = GroupRows(stream, n, ids, n_adapters, reinterpret_cast<int*>(base),
                bad_row, &m);
  // x a_k (given: float only) and g b_k^T per row (zero without an adapter).
  const float* xa_given = nullptr;
  if constexpr (std::is_same<T, float>::value) xa_given = xa_in;
  float *xa, *gb;
  if (e == kSuccess) {
    e = ShrinkXaGb<T>(stream, m, p.tiles, p.xa_gb, base, n, in, out, r, x,
                      a_stack, g, b_stack, &xa, &gb, xa_given);
  }
  if (e != kSuccess) return e;
  // u = scales_k (g b_k^T) per row (+ grad_xa); dx = u a_k^T per row (zero
  // rows without an adapter); da_k = x^T u over adapter k's rows.
  const float* u = gb;
  const T* u_scales = scales;
  if (grad_xa != nullptr) {
    float* combined = reinterpret_cast<float*>(base + p.u);
    auto* combine = CombineRows<T>;
    TF_LORA_LAUNCH(combine, dim3(CeilDiv(n * r, 256)), dim3(256), stream, n, r,
                   ids, n_adapters, scales, gb, grad_xa, combined);
    u = combined;
    u_scales = nullptr;
  }
  e = LaunchExpand<T, float, true>(stream, m, p.tiles, nullptr, dx, in, r, u,
                                   nullptr, 0, a_stack, u_scales, 1.f, nullptr);
  if (e != kSuccess) return e;
  // da_k = scales_k x^T (g b_k^T), db_k = scales_k (x a_k)^T g over adapter
  // k's rows; dscales_k = sum (x a_k) * (g b_k^T) over them.
  const dim3 block(kShrinkThreads);
  auto* reduce = ReduceRows<T>;
  float* no_partial = nullptr;
  // One launch per max_grid_yz adapters (gridDim.y is at most 65535).
  for (int64_t base = 0; base < n_adapters; base += max_grid_yz) {
    const auto count = static_cast<unsigned>(
        std::min<int64_t>(max_grid_yz, n_adapters - base));
    TF_LORA_LAUNCH(
        reduce, dim3(CeilDiv(in, kReduceCols), count, CeilDiv(r, kReduceCols)),
        block, stream, n, in, r, x, u, int64_t{0}, no_partial, m.order,
        m.seg_start, u_scales, false, da, base);
    if (out == 0) continue;  // db is empty
    TF_LORA_LAUNCH(
        reduce, dim3(CeilDiv(out, kReduceCols), count, CeilDiv(r, kReduceCols)),
        block, stream, n, out, r, g, xa, int64_t{0}, no_partial, m.order,
        m.seg_start, scales, true, db, base);
  }
  auto* dots = SegmentDots<T>;
  TF_LORA_LAUNCH(dots, dim3(n_adapters), dim3(256), stream, r, m.order,
                 m.seg_start, xa, gb, dscales);
  return LastLaunchError();
}

#define TF_LORA_INSTANTIATE(T)                                                 \
  template Error LoraMerge<T>(Stream, int64_t, int64_t, int64_t, const T*,     \
                              const T*, const T*, float, T*);                  \
  template Error LoraApply<T>(Stream, int64_t, int64_t, int64_t, int64_t,      \
                              const T*, const T*, const T*, const T*, float,   \
                              T*, T*, void*);                                  \
  template Error LoraApplyGrad<T>(                                             \
      Stream, int64_t, int64_t, int64_t, int64_t, const T*, const T*,          \
      const T*, const T*, float, T*, T*, T*, T*, void*, const T*, const T*);   \
  template Error BatchedLoraApplyGrad<T>(                                      \
      Stream, int64_t, int64_t, int64_t, int64_t, int64_t, const T*, const T*, \
      const T*, const T*, const int32_t*, const T*, T*, T*, T*, T*, void*,     \
      int*, const T*, const T*);                                               \
  template Error BatchedLoraApply<T>(                                          \
      Stream, int64_t, int64_t, int64_t, int64_t, int64_t, const T*, const T*, \
      const T*, const T*, const int32_t*, const T*, T*, T*, void*, int*);
TF_LORA_INSTANTIATE(float)
TF_LORA_INSTANTIATE(Half)
TF_LORA_INSTANTIATE(BFloat16)
#undef TF_LORA_INSTANTIATE

}  // namespace gpu
}  // namespace tf_lora
