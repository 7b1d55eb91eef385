// LoRA op family: CPU functors.
//
// Plain C++ over raw pointers plus Eigen's ThreadPoolDevice for threading, so
// lora_cpu_test.cc can test it without an OpKernel. Two kernels do the work:
//   RowUpdate  c_out[rows, cols] = c_in + scale * A[rows, k] @ B[k, cols]
//              (LoraMerge: c = w, A = a; LoraApply: c = y, A = x @ a)
//   XaProduct  xa[rows, r] = x[rows, in] @ a[in, r]
// Their vector code (lora_cpu_simd.inc, GCC vector extensions) is compiled
// three times: for AVX-512 and for AVX2+FMA+F16C, picked at run time when the
// CPU has them, and for the baseline ISA, so the wheel needs no more of the
// CPU than TensorFlow does.

#define EIGEN_USE_THREADS

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "core/kernels/lora.h"
#include "core/kernels/worker_exceptions.h"
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

// Rows per parallel block (each ISA's register tile height divides it).
constexpr int kRows = 8;

// RowUpdate writes outputs of at least this size with non-temporal stores.
constexpr int64_t kStreamOutBytes = 8 << 20;

// Eigen's parallelFor cost model counts cycles: the kernels retire about this
// many multiply-adds per cycle (AVX2: 2 FMA ports x 8 floats). Counting one
// cycle per multiply-add overstates small jobs 16x, and Eigen then spreads
// microsecond jobs over threads whose wake-up costs more than the work.
constexpr double kMaddsPerCycle = 16;

// Columns per register tile: 64 bytes of the accumulation type.
template <typename Acc>
constexpr int64_t kTile = 64 / sizeof(Acc);

template <typename Acc>
int64_t NumTiles(int64_t cols) {
  return (cols + kTile<Acc> - 1) / kTile<Acc>;
}

// Scratch memory for a kernel call, from a per-thread pool of buffers that
// keep their pages: packed operands, x @ a and gradient partials would
// otherwise be fresh allocations each call, and on a VM first-touch page
// faults cost more than the work at small sizes (decode, N = 1: see
// benchmarks/RESULTS.md). Released buffers go back
// to the pool while it holds at most kMaxPooled buffers of kMaxPooledBytes in
// all; requests take the smallest buffer that fits.
template <typename T>
class Scratch {
 public:
  // n == 0 holds no memory.
  explicit Scratch(int64_t n)
      : bytes_(n >= 0 && n <= kMaxElements ? n * int64_t{sizeof(T)} : -1) {
    // The kernels' glue checks the sizes first (CheckWorkSizes); a size that
    // still could not be a buffer fails as memory that cannot be had.
    if (bytes_ < 0) throw std::bad_alloc();
    if (bytes_ == 0) return;
    // The smallest pooled buffer that fits.
    std::vector<Buffer>& pool = Pool();
    auto best = pool.end();
    for (auto it = pool.begin(); it != pool.end(); ++it) {
      if (it->bytes >= bytes_ &&
          (best == pool.end() || it->bytes < best->bytes)) {
        best = it;
      }
    }
    if (best != pool.end()) {
      buffer_ = std::move(*best);
      pool.erase(best);
    } else {
      buffer_.data.reset(
          static_cast<char*>(::operator new(bytes_, std::align_val_t(kAlign))));
      buffer_.bytes = bytes_;
    }
  }
  ~Scratch() {
    if (buffer_.data == nullptr) return;
    std::vector<Buffer>& pool = Pool();
    int64_t pooled = buffer_.bytes;
    for (const Buffer& b : pool) pooled += b.bytes;
    if (pool.size() < kMaxPooled && pooled <= kMaxPooledBytes) {
      pool.push_back(std::move(buffer_));
    }
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;

  T* data() { return reinterpret_cast<T*>(buffer_.data.get()); }
  const T* data() const {
    return reinterpret_cast<const T*>(buffer_.data.get());
  }

 private:
  static constexpr int64_t kMaxElements =
      std::numeric_limits<int64_t>::max() / sizeof(T);
  static constexpr size_t kAlign = 64;
  // Per thread and element type, in all: TensorFlow runs ops on many
  // long-lived threads, so what a thread keeps must stay small.
  static constexpr int64_t kMaxPooledBytes = 64 << 20;
  static constexpr size_t kMaxPooled = 8;
  struct Free {
    void operator()(char* p) const {
      ::operator delete(p, std::align_val_t(kAlign));
    }
  };
  struct Buffer {
    std::unique_ptr<char, Free> data;
    int64_t bytes = 0;
  };
  static std::vector<Buffer>& Pool() {
    static thread_local std::vector<Buffer> pool;
    return pool;
  }

  int64_t bytes_;
  Buffer buffer_;
};

// Packs the [k, cols] matrix whose element (kk, c) is src[kk * k_stride + c *
// col_stride] (row-major: col_stride 1; a transpose: k_stride 1) into
// [NumTiles(cols), k, kTile] of Acc, zero-padded past `cols`, so a tile's k
// rows are contiguous. Walking a row-major matrix down a column directly steps
// `cols` elements per k: at cols = 4096 every row lands in the same L1 set and
// thrashes it.
template <typename Acc, typename T>
void PackTiles(const T* src, int64_t k, int64_t cols, int64_t k_stride,
               int64_t col_stride, Acc* packed) {
  for (int64_t t = 0; t < NumTiles<Acc>(cols); ++t) {
    const int64_t j0 = t * kTile<Acc>;
    const int64_t width = std::min(kTile<Acc>, cols - j0);
    for (int64_t kk = 0; kk < k; ++kk) {
      Acc* dst = packed + (t * k + kk) * kTile<Acc>;
      for (int64_t c = 0; c < width; ++c) {
        dst[c] = static_cast<Acc>(src[kk * k_stride + (j0 + c) * col_stride]);
      }
      std::fill(dst + width, dst + kTile<Acc>, Acc(0));
    }
  }
}

// A [k, cols] matrix seen as column tiles: tile t's row kk (kTile values)
// starts at base + t * tile_stride + kk * k_stride.
template <typename Acc>
struct Tiles {
  const Acc* base;
  int64_t k_stride, tile_stride;
  const Acc* Tile(int64_t t) const { return base + t * tile_stride; }
};

// A [k, cols] matrix as Tiles: the matrix itself when it is row-major and its
// layout already is one (T is the accumulation type, whole tiles) and
// `in_place` is allowed, else a packed copy in scratch memory. Packing costs a
// pass, and pays off when several row blocks reuse each tile. `transposed`:
// src is the row-major [cols, k] matrix whose transpose is packed.
template <typename Acc>
class TiledMatrix {
 public:
  template <typename T>
  TiledMatrix(const T* src, int64_t k, int64_t cols, bool in_place,
              bool transposed = false)
      : use_src_(std::is_same_v<T, Acc> && in_place && !transposed &&
                 cols % kTile<Acc> == 0),
        packed_(use_src_ ? 0 : NumTiles<Acc>(cols) * k * kTile<Acc>) {
    if constexpr (std::is_same_v<T, Acc>) {
      if (use_src_) {
        tiles_ = {src, cols, kTile<Acc>};
        return;
      }
    }
    PackTiles(src, k, cols, transposed ? 1 : cols, transposed ? k : 1,
              packed_.data());
    tiles_ = {packed_.data(), kTile<Acc>, k * kTile<Acc>};
  }
  const Tiles<Acc>& tiles() const { return tiles_; }

 private:
  bool use_src_;
  Scratch<Acc> packed_;
  Tiles<Acc> tiles_;
};

// c_out[rows, cols] = c_in + scale * A[rows, k] @ B[k, cols]; c_out may alias
// c_in. TA is T (merge: A = a) or the accumulation type (apply: A = x @ a).
// With rows_map, row i of A updates row rows_map[i] of c_in and c_out.
template <typename T, typename TA>
struct RowUpdateArgs {
  using Acc = typename Accum<T>::type;
  int64_t rows, cols, k;
  const T* c_in;
  const TA* a;
  int64_t lda;          // row stride of A
  Tiles<Acc> b;         // B
  int64_t panel_tiles;  // tiles per column panel: k * panel fits in L2
  Acc scale;
  T* c_out;
  const int64_t* rows_map = nullptr;  // rows of c_in/c_out (null: i -> i)
  // Write c_out with non-temporal stores, through a small staging buffer
  // (see RowUpdateBlocks). Only where c_out is large and not c_in.
  bool stream_out = false;

  int64_t Row(int64_t i) const { return rows_map != nullptr ? rows_map[i] : i; }
};

// xa[rows, NumTiles(r) * kTile] = x[rows, in] @ a[in, r] in the accumulation
// type (padding columns are zero).
template <typename T>
struct XaArgs {
  using Acc = typename Accum<T>::type;
  int64_t rows, in, r;
  const T* x;
  Tiles<Acc> a;
  Acc* xa;
  const int64_t* rows_map = nullptr;  // row i of xa from row rows_map[i] of x
};

// dx, da, db, dscale of LoraApply for upstream gradient g ([n, out]), in one
// pass over row blocks of g and x. Shards of rows (their number depends on n
// only, so results do not depend on the thread count) accumulate partial da^T
// and db, each shard's tile-major ([NumTiles(in), r, kTile] and
// [NumTiles(out), r, kTile]; ld_in, ld_out: in and out in whole tiles; each
// shard zeroes its own), and dscale [shards], summed in shard order after.
constexpr int64_t kGradBlockRows = 32;  // rows per super-block

// Shards of a quarter of the rows, kept between kMinShardRows and
// kMaxShardRows rows, at most kMaxShards of them; the count depends on n
// alone. Each shard's partials (r * (in + out) values) are zeroed, filled and
// summed once per call, so shards must not be small: 16 shards at N = 4096
// were 5-15% slower than 4. But one shard runs on one thread: at N = 1024 (a
// batch of 8 x 128 tokens) a single 1024-row shard left a core idle and took
// 1.9x as long as four.
constexpr int64_t kMinShardRows = 64, kMaxShardRows = 1024, kMaxShards = 16;

// The number of shards for n rows.
int64_t GradShards(int64_t n) {
  const int64_t quarter_rows =
      std::clamp((n + 3) / 4, kMinShardRows, kMaxShardRows);
  return std::max<int64_t>(
      1, std::min(kMaxShards, (n + quarter_rows - 1) / quarter_rows));
}

template <typename T>
struct LoraGradArgs {
  using Acc = typename Accum<T>::type;
  int64_t n, in, out, r, lda;  // lda: r rounded up to whole tiles
  const T* g;
  const T* x;
  Tiles<Acc> a;   // tiles over r: x @ a
  Tiles<Acc> bt;  // b^T, tiles over r: g @ b^T
  Tiles<Acc> at;  // a^T, tiles over in: (g b^T) @ a^T
  Acc scale;
  T* dx;
  int64_t shard_rows, ld_in, ld_out;
  Acc* da_t_parts;
  Acc* db_parts;
  Acc* dscale_parts;
  const int64_t* rows_map = nullptr;  // rows of g, x, dx (null: i -> i)
  bool stream_dx = false;             // see RowUpdateArgs::stream_out
  // [n, r] (rows as g's), or null: x @ a as LoraApply computed it (then not
  // computed here; only where T is Acc), and the gradient for it (added to
  // scale * g @ b^T for dx and da).
  const T* xa = nullptr;
  const T* grad_xa = nullptr;
};

// g++ only: clang has no `#pragma GCC target` (it would build the AVX2 region
// for the baseline ISA and reject its intrinsics), so clang builds the
// baseline code alone.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#define TF_LORA_SIMD_AVX2 1
#include "core/kernels/lora_cpu_simd.inc"
#undef TF_LORA_SIMD_AVX2
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")
// GCC 12's own avx512fintrin.h builds "undefined" vectors as `__m512 __Y =
// __Y;`, which its -Wmaybe-uninitialized then reports in every caller.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
namespace avx512 {
#define TF_LORA_SIMD_AVX2 0
#define TF_LORA_SIMD_AVX512 1
#include "core/kernels/lora_cpu_simd.inc"
#undef TF_LORA_SIMD_AVX512
#undef TF_LORA_SIMD_AVX2
}  // namespace avx512
#pragma GCC diagnostic pop
#pragma GCC pop_options

// The AVX-512 code where the CPU has AVX-512 (F, VL, BW, DQ). TF_LORA_CPU_ISA
// (baseline, avx2 or avx512) caps the code path, like oneDNN's
// ONEDNN_MAX_CPU_ISA: to test each path, or to compare them.
bool UseAvx512() {
  static const bool use = [] {
    const char* isa = std::getenv("TF_LORA_CPU_ISA");
    if (isa != nullptr && std::strcmp(isa, "avx512") != 0) return false;
    return __builtin_cpu_supports("avx512f") &&
           __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma");
  }();
  return use;
}

bool UseAvx2() {
  static const bool use = [] {
    const char* isa = std::getenv("TF_LORA_CPU_ISA");
    if (isa != nullptr && std::strcmp(isa, "baseline") == 0) return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  }();
  return use;
}
#else
bool UseAvx2() { return false; }
bool UseAvx512() { return false; }
#endif

namespace baseline {
#define TF_LORA_SIMD_AVX2 0
#include "core/kernels/lora_cpu_simd.inc"
#undef TF_LORA_SIMD_AVX2
}  // namespace baseline

#if !(defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__))
namespace avx2 = baseline;  // UseAvx2() is false: never taken
namespace avx512 = baseline;
#endif

// d.parallelFor, with any exception a worker throws (a scratch vector that
// cannot be allocated) carried to the calling thread, which turns it into an
// error status: thrown on a pool thread it would end the process.
template <typename Fn>
void ParallelFor(const Eigen::ThreadPoolDevice& d, Eigen::Index n,
                 const Eigen::TensorOpCost& cost, Fn&& fn) {
  WorkerExceptions errors;
  d.parallelFor(n, cost, [&](Eigen::Index begin, Eigen::Index end) {
    errors.Run([&] { fn(begin, end); });
  });
  errors.Rethrow();
}

// The AVX2 or the baseline build of a kernel over row blocks.
template <typename Args>
using BlockKernel = void (*)(const Args&, int64_t, int64_t);

template <typename Args>
BlockKernel<Args> Pick(BlockKernel<Args> avx512_kernel,
                       BlockKernel<Args> avx2_kernel,
                       BlockKernel<Args> baseline_kernel) {
  if (UseAvx512()) return avx512_kernel;
  return UseAvx2() ? avx2_kernel : baseline_kernel;
}

// Whether c_out ([rows, cols] of T; c_in, when not null, is read beside it)
// is written with non-temporal stores. They spare an out-of-place c_out the
// read for ownership that ordinary stores cost (a third of the traffic of
// w + s * a @ b), but leave it out of the caches: only for outputs well past
// L2, 32-byte aligned rows, and not in place (there c_in's read already
// brought the lines in).
template <typename T>
bool StreamOut(const T* c_in, const T* c_out, int64_t rows, int64_t cols) {
  return c_out != c_in &&
         rows * cols * static_cast<int64_t>(sizeof(T)) >= kStreamOutBytes &&
         reinterpret_cast<uintptr_t>(c_out) % 32 == 0 &&
         cols * sizeof(T) % 32 == 0;
}

// Runs RowUpdate over all rows on the device's threads.
template <typename T, typename TA>
void RowUpdate(const Eigen::ThreadPoolDevice& d, int64_t rows, int64_t cols,
               int64_t k, const T* c_in, const TA* a, int64_t lda, const T* b,
               T scale, T* c_out, const int64_t* rows_map = nullptr) {
  using Acc = typename Accum<T>::type;
  if (rows == 0 || cols == 0) return;
  const bool stream_out = StreamOut(c_in, c_out, rows, cols);
  // B's column panel stays in L2 (half of it) while the rows pass. A panel
  // as wide as the row (4096 columns at r = 16) keeps each row one long
  // stream, which the hardware prefetchers and the non-temporal stores
  // follow better than half-row panels (benchmarks/RESULTS.md).
  constexpr int64_t kPanelBytes = 256 << 10;
  // Rows that fit one register tile read each tile of B once: B as it is
  // serves them. More rows reread it, and a tile's k rows (`cols` apart,
  // 16 KiB at 4096 floats) would share one L1 set: packed, they are contiguous.
  const TiledMatrix<Acc> b_tiles(b, k, cols, /*in_place=*/rows <= kRows);
  const int64_t panel_tiles = std::max<int64_t>(
      1, kPanelBytes / (std::max<int64_t>(k, 1) * kTile<Acc> * sizeof(Acc)));
  const RowUpdateArgs<T, TA> p{rows,
                               cols,
                               k,
                               c_in,
                               a,
                               lda,
                               b_tiles.tiles(),
                               panel_tiles,
                               static_cast<Acc>(scale),
                               c_out,
                               rows_map,
                               stream_out};
  const auto kernel = Pick<RowUpdateArgs<T, TA>>(
      &avx512::RowUpdateBlocks<T, TA>, &avx2::RowUpdateBlocks<T, TA>,
      &baseline::RowUpdateBlocks<T, TA>);
  const double row_bytes = static_cast<double>(cols * sizeof(T));
  const Eigen::TensorOpCost cost(
      kRows * (row_bytes + k * sizeof(TA)), kRows * row_bytes,
      kRows * static_cast<double>(cols) * k / kMaddsPerCycle);
  ParallelFor(d, (rows + kRows - 1) / kRows, cost,
              [&p, kernel](Eigen::Index begin, Eigen::Index end) {
                kernel(p, begin, end);
              });
}

// Groups rows by adapter id (stable counting sort), so that each adapter runs
// the single-adapter kernels over its rows through a row map. Group g holds
// the rows with id g - 1 (g = 0: id -1, no adapter), at
// order[start[g] .. start[g + 1]).
void GroupRowsByAdapter(int64_t n, int64_t adapters, const int32_t* ids,
                        std::vector<int64_t>* start,
                        std::vector<int64_t>* order) {
  const int64_t groups = adapters + 1;
  start->assign(groups + 1, 0);
  for (int64_t i = 0; i < n; ++i) ++(*start)[ids[i] + 2];  // count of group
  for (int64_t g = 1; g <= groups; ++g) (*start)[g] += (*start)[g - 1];
  std::vector<int64_t> next(start->begin(), start->end() - 1);
  order->resize(n);
  for (int64_t i = 0; i < n; ++i) (*order)[next[ids[i] + 1]++] = i;
}

// y_out[row] = y[row] + scale * (x[row] @ a) @ b for `rows` rows: row i is
// rows_map[i], or i when rows_map is null. Two passes, each keeping one operand
// hot in L2: xa = x @ a ([rows, r] in the accumulation type, small beside x),
// then one pass over y. xa_out, when not null, receives x @ a ([rows, r]).
template <typename T>
void ApplyRows(const Eigen::ThreadPoolDevice& d, int64_t rows,
               const int64_t* rows_map, int64_t in, int64_t out, int64_t r,
               const T* y, const T* x, const T* a, const T* b, T scale,
               T* y_out, T* xa_out = nullptr) {
  using Acc = typename Accum<T>::type;
  const auto row_of = [rows_map](int64_t i) {
    return rows_map != nullptr ? rows_map[i] : i;
  };
  if (rows == 0 || (out == 0 && xa_out == nullptr)) return;
  if (in == 0 || r == 0) {  // x @ a is zero: the rows pass through
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t row = row_of(i);
      if (y_out != y) std::copy_n(y + row * out, out, y_out + row * out);
      if (xa_out != nullptr) std::fill_n(xa_out + row * r, r, T(0));
    }
    return;
  }
  const TiledMatrix<Acc> a_tiles(a, in, r, /*in_place=*/true);
  const int64_t lda = NumTiles<Acc>(r) * kTile<Acc>;
  Scratch<Acc> xa(rows * lda);
  const XaArgs<T> p{rows, in, r, x, a_tiles.tiles(), xa.data(), rows_map};
  const auto kernel =
      Pick<XaArgs<T>>(&avx512::XaRowBlocks<T>, &avx2::XaRowBlocks<T>,
                      &baseline::XaRowBlocks<T>);
  const Eigen::TensorOpCost cost(
      kRows * in * sizeof(T), kRows * lda * sizeof(Acc),
      kRows * static_cast<double>(in) * lda / kMaddsPerCycle);
  ParallelFor(d, (rows + kRows - 1) / kRows, cost,
              [&p, kernel](Eigen::Index begin, Eigen::Index end) {
                kernel(p, begin, end);
              });
  if (xa_out != nullptr) {
    for (int64_t i = 0; i < rows; ++i) {
      std::transform(xa.data() + i * lda, xa.data() + i * lda + r,
                     xa_out + row_of(i) * r,
                     [](Acc v) { return static_cast<T>(v); });
    }
  }
  if (out == 0) return;
  RowUpdate(d, rows, out, r, y, xa.data(), lda, b, scale, y_out, rows_map);
}

}  // namespace

const char* CpuCodePath() {
  if (UseAvx512()) return "avx512";
  return UseAvx2() ? "avx2" : "baseline";
}

template <typename T>
void LoraMerge<Eigen::ThreadPoolDevice, T>::operator()(
    const Eigen::ThreadPoolDevice& d, int64_t in, int64_t out, int64_t r,
    const T* w, const T* a, const T* b, T scale, T* merged) const {
  RowUpdate(d, in, out, r, w, a, /*lda=*/r, b, scale, merged);
}

template <typename T>
void LoraApply<Eigen::ThreadPoolDevice, T>::operator()(
    const Eigen::ThreadPoolDevice& d, int64_t n, int64_t in, int64_t out,
    int64_t r, const T* y, const T* x, const T* a, const T* b, T scale,
    T* y_out, T* xa) const {
  ApplyRows(d, n, /*rows_map=*/nullptr, in, out, r, y, x, a, b, scale, y_out,
            xa);
}

template <typename T>
void BatchedLoraApply<Eigen::ThreadPoolDevice, T>::operator()(
    const Eigen::ThreadPoolDevice& d, int64_t n, int64_t in, int64_t out,
    int64_t r, int64_t adapters, const T* y, const T* x, const T* a_stack,
    const T* b_stack, const int32_t* ids, const T* scales, T* y_out,
    T* xa) const {
  if (n == 0 || (out == 0 && xa == nullptr)) return;
  std::vector<int64_t> start, order;
  GroupRowsByAdapter(n, adapters, ids, &start, &order);
  for (int64_t e = start[0]; e < start[1]; ++e) {  // rows with no adapter
    if (y_out != y) {
      std::copy_n(y + order[e] * out, out, y_out + order[e] * out);
    }
    if (xa != nullptr) std::fill_n(xa + order[e] * r, r, T(0));
  }
  for (int64_t k = 0; k < adapters; ++k) {
    const int64_t begin = start[k + 1], rows = start[k + 2] - begin;
    ApplyRows(d, rows, order.data() + begin, in, out, r, y, x,
              a_stack + k * in * r, b_stack + k * r * out, scales[k], y_out,
              xa);
  }
}

namespace {

// LoraApplyGrad over n rows (row i is rows_map[i], or i when rows_map is
// null): dx for those rows, and da, db, dscale from them alone. On d's
// threads, or with d null all on the calling thread (the same results). xa
// and grad_xa: see LoraApplyGrad (lora.h); null when not given.
template <typename T>
void GradRows(const Eigen::ThreadPoolDevice* d, int64_t n,
              const int64_t* rows_map, int64_t in, int64_t out, int64_t r,
              const T* g, const T* x, const T* a, const T* b, T scale, T* dx,
              T* da, T* db, T* dscale, const T* xa = nullptr,
              const T* grad_xa = nullptr) {
  using Acc = typename Accum<T>::type;
  // With grad_xa, dx and da are not zero when only `out` is.
  if (n == 0 || in == 0 || r == 0 || (out == 0 && grad_xa == nullptr)) {
    // Every product has an empty factor: the gradients are zeros. Filled
    // here, in time bounded by the outputs' sizes (an empty tensor may have
    // other dimensions up to 2^63 - 1).
    std::fill_n(da, in * r, T(0));
    std::fill_n(db, r * out, T(0));
    *dscale = T(0);
    if (in > 0) {
      for (int64_t i = 0; i < n; ++i) {
        std::fill_n(dx + (rows_map != nullptr ? rows_map[i] : i) * in, in,
                    T(0));
      }
    }
    return;
  }
  const auto run = [d](Eigen::Index count, const Eigen::TensorOpCost& cost,
                       auto&& fn) {
    if (d != nullptr) {
      ParallelFor(*d, count, cost, fn);
    } else {
      fn(0, count);
    }
  };
  const int64_t lda = NumTiles<Acc>(r) * kTile<Acc>;
  const int64_t shards = GradShards(n);
  const int64_t shard_rows = (n + shards - 1) / shards;
  const TiledMatrix<Acc> a_tiles(a, in, r, /*in_place=*/true);
  const TiledMatrix<Acc> bt_tiles(b, out, r, false, /*transposed=*/true);
  const TiledMatrix<Acc> at_tiles(a, r, in, false, /*transposed=*/true);
  const int64_t ld_in = NumTiles<Acc>(in) * kTile<Acc>;
  const int64_t ld_out = NumTiles<Acc>(out) * kTile<Acc>;
  Scratch<Acc> da_t_parts(shards * r * ld_in), db_parts(shards * r * ld_out),
      dscale_parts(shards);
  const LoraGradArgs<T> p{n,
                          in,
                          out,
                          r,
                          lda,
                          g,
                          x,
                          a_tiles.tiles(),
                          bt_tiles.tiles(),
                          at_tiles.tiles(),
                          static_cast<Acc>(scale),
                          dx,
                          shard_rows,
                          ld_in,
                          ld_out,
                          da_t_parts.data(),
                          db_parts.data(),
                          dscale_parts.data(),
                          rows_map,
                          StreamOut<T>(nullptr, dx, n, in),
                          std::is_same_v<T, Acc> ? xa : nullptr,
                          grad_xa};
  const auto kernel = Pick<LoraGradArgs<T>>(&avx512::LoraGradShards<T>,
                                            &avx2::LoraGradShards<T>,
                                            &baseline::LoraGradShards<T>);
  const double madds = 5.0 * shard_rows * r * (in + out) / kMaddsPerCycle;
  run(shards,
      Eigen::TensorOpCost(shard_rows * (in + out) * sizeof(T),
                          shard_rows * in * sizeof(T), madds),
      [&p, kernel](Eigen::Index begin, Eigen::Index end) {
        kernel(p, begin, end);
      });
  // Sum the shards' partials in shard order: db[k, j], and da[i, k] from the
  // transposed partials. Element (k, c) of a shard's part is at
  // (c / kTile * r + k) * kTile + c % kTile.
  const auto sum_shards = [&](const Scratch<Acc>& parts, int64_t ld,
                              int64_t cols, auto&& store) {
    constexpr int64_t kT = kTile<Acc>;
    run(ld / kT,
        Eigen::TensorOpCost(shards * r * kT * sizeof(Acc), r * kT * sizeof(T),
                            shards * r * kT),
        [&](Eigen::Index begin, Eigen::Index end) {
          for (Eigen::Index t = begin; t < end; ++t) {
            const int64_t c0 = t * kT, width = std::min(kT, cols - c0);
            for (int64_t k = 0; k < r; ++k) {
              Acc sum[kT] = {};
              for (int64_t s = 0; s < shards; ++s) {
                const Acc* part = parts.data() + s * r * ld + (t * r + k) * kT;
                for (int64_t c = 0; c < kT; ++c) sum[c] += part[c];
              }
              for (int64_t c = 0; c < width; ++c) store(k, c0 + c, sum[c]);
            }
          }
        });
  };
  sum_shards(db_parts, ld_out, out, [db, out](int64_t k, int64_t j, Acc v) {
    db[k * out + j] = static_cast<T>(v);
  });
  sum_shards(da_t_parts, ld_in, in, [da, r](int64_t k, int64_t i, Acc v) {
    da[i * r + k] = static_cast<T>(v);
  });
  Acc total = 0;
  for (int64_t s = 0; s < shards; ++s) total += dscale_parts.data()[s];
  *dscale = static_cast<T>(total);
}

}  // namespace

template <typename T>
void LoraApplyGrad<Eigen::ThreadPoolDevice, T>::operator()(
    const Eigen::ThreadPoolDevice& d, int64_t n, int64_t in, int64_t out,
    int64_t r, const T* g, const T* x, const T* a, const T* b, T scale, T* dx,
    T* da, T* db, T* dscale, const T* xa, const T* grad_xa) const {
  GradRows(&d, n, /*rows_map=*/nullptr, in, out, r, g, x, a, b, scale, dx, da,
           db, dscale, xa, grad_xa);
}

template <typename T>
void BatchedLoraApplyGrad<Eigen::ThreadPoolDevice, T>::operator()(
    const Eigen::ThreadPoolDevice& d, int64_t n, int64_t in, int64_t out,
    int64_t r, int64_t adapters, const T* g, const T* x, const T* a_stack,
    const T* b_stack, const int32_t* ids, const T* scales, T* dx, T* da_stack,
    T* db_stack, T* dscales, const T* xa, const T* grad_xa) const {
  std::vector<int64_t> start, order;
  GroupRowsByAdapter(n, adapters, ids, &start, &order);
  if (in > 0) {
    for (int64_t e = start[0]; e < start[1]; ++e) {  // rows with no adapter
      std::fill_n(dx + order[e] * in, in, T(0));
    }
  }
  const auto adapter_grad = [&](int64_t k, const Eigen::ThreadPoolDevice* on) {
    const int64_t begin = start[k + 1], rows = start[k + 2] - begin;
    GradRows(on, rows, order.data() + begin, in, out, r, g, x,
             a_stack + k * in * r, b_stack + k * r * out, scales[k], dx,
             da_stack + k * in * r, db_stack + k * r * out, dscales + k, xa,
             grad_xa);
  };
  // An adapter of one shard runs on one thread: those adapters go side by
  // side, each on one thread, and the others one after another, each over its
  // shards in parallel. Either way an adapter's gradients do not depend on
  // the thread count.
  std::vector<int64_t> small;
  int64_t small_rows = 0;
  for (int64_t k = 0; k < adapters; ++k) {
    const int64_t rows = start[k + 2] - start[k + 1];
    if (GradShards(rows) > 1) {
      adapter_grad(k, &d);
    } else {
      small.push_back(k);
      small_rows += rows;
    }
  }
  if (small.empty()) return;
  const double rows = static_cast<double>(small_rows) / small.size();
  const double width = static_cast<double>(r) * (in + out);  // a and b
  ParallelFor(d, small.size(),
              Eigen::TensorOpCost((rows * (in + out) + width) * sizeof(T),
                                  (rows * in + width) * sizeof(T),
                                  (5 * rows + 4) * width / kMaddsPerCycle),
              [&](Eigen::Index begin, Eigen::Index end) {
                for (Eigen::Index i = begin; i < end; ++i)
                  adapter_grad(small[i], nullptr);
              });
}

#define TF_LORA_INSTANTIATE(T)                                  \
  template struct LoraMerge<Eigen::ThreadPoolDevice, T>;        \
  template struct LoraApply<Eigen::ThreadPoolDevice, T>;        \
  template struct LoraApplyGrad<Eigen::ThreadPoolDevice, T>;    \
  template struct BatchedLoraApply<Eigen::ThreadPoolDevice, T>; \
  template struct BatchedLoraApplyGrad<Eigen::ThreadPoolDevice, T>;
TF_LORA_INSTANTIATE(float)
TF_LORA_INSTANTIATE(double)
TF_LORA_INSTANTIATE(Eigen::half)
TF_LORA_INSTANTIATE(Eigen::bfloat16)
#undef TF_LORA_INSTANTIATE

}  // namespace functor
}  // namespace tf_lora
