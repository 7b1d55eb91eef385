// LoRA GPU kernels: launchers over raw device pointers and a stream, with no
// TensorFlow in them, so that a CUDA-only harness (tests/gpu) can test and
// time them on a machine without TensorFlow. Matrices are row-major; T is
// float, Half or BFloat16 (gpu_portability.h), and every sum accumulates in
// float32.
//
// The math is lora.h's: merge `w + scale * a @ b`; apply
// `y + scale * (x @ a) @ b`; batched apply, where row i adds adapter ids[i]
// of the stacked adapters (a_stack [n, in, r], b_stack [n, r, out], scales
// [n]) and id -1 leaves the row as it is. Outputs may alias `w` / `y`.
//
// How: a "shrink" kernel computes x @ a ([rows, r]) in tiles of rows, split
// over `in` for parallelism into float partial sums (no atomics: results do
// not depend on timing); an "expand" kernel adds the scaled sum of those
// partials times b to y in one pass over y. Merge is the expand alone, with a
// in place of x @ a. Batched apply runs the same two kernels over tiles of
// rows that share an adapter: rows are grouped by adapter on the device
// (SGMV-style segments, for many rows), or, for few rows, each row is its own
// tile reading its own adapter (BGMV-style, for decoding). Ids stay on the
// device; one outside [-1, n) is never read through: its row is left as it
// is and the smallest such row is written to `bad_row`.

#ifndef TF_LORA_CORE_KERNELS_LORA_GPU_H_
#define TF_LORA_CORE_KERNELS_LORA_GPU_H_

#include <cstddef>
#include <cstdint>

#include "core/kernels/gpu_portability.h"

namespace tf_lora {
namespace gpu {

// `*bad_row` after a batched apply whose ids were all in [-1, n).
constexpr int kNoBadRow = 0x7f7f7f7f;

// Batches of at most this many rows take one tile per row (no grouping).
constexpr int64_t kPerRowTilesUpTo = 64;

// result = w + scale * a @ b; w and result [in, out], a [in, r], b [r, out].
template <typename T>
Error LoraMerge(Stream stream, int64_t in, int64_t out, int64_t r, const T* w,
                const T* a, const T* b, float scale, T* result);

// Device scratch LoraApply needs (bytes, 16-byte aligned).
size_t LoraApplyWorkspaceBytes(int64_t n, int64_t in, int64_t r);

// y_out = y + scale * (x @ a) @ b; y and y_out [n, out], x [n, in]; x @ a
// also to xa [n, r] (rounded to T), for the gradient.
template <typename T>
Error LoraApply(Stream stream, int64_t n, int64_t in, int64_t out, int64_t r,
                const T* y, const T* x, const T* a, const T* b, float scale,
                T* y_out, T* xa, void* workspace);

size_t LoraApplyGradWorkspaceBytes(int64_t n, int64_t in, int64_t out,
                                   int64_t r);

// The gradients of LoraApply (the CPU kernel's LoraApplyGrad): with
// g = dL/dy_out [n, out], dx = scale * (g b^T) a^T [n, in],
// da = scale * x^T (g b^T) [in, r], db = scale * (x a)^T g [r, out] and
// dscale = sum((x a) * (g b^T)) (a device scalar). With xa and grad_xa (both
// [n, r], or both null): LoraApply's x @ a, used for x a where T is float
// (half types compute it again, in float32), and the gradient for it, added
// to scale * (g b^T) in dx and da.
template <typename T>
Error LoraApplyGrad(Stream stream, int64_t n, int64_t in, int64_t out,
                    int64_t r, const T* g, const T* x, const T* a, const T* b,
                    float scale, T* dx, T* da, T* db, T* dscale,
                    void* workspace, const T* xa = nullptr,
                    const T* grad_xa = nullptr);

size_t BatchedLoraApplyWorkspaceBytes(int64_t n, int64_t in, int64_t r,
                                      int64_t adapters);

// Row i: y_out[i] = y[i] + scales[k] * (x[i] @ a_stack[k]) @ b_stack[k] with
// k = ids[i]; k = -1, or k outside [-1, adapters) (then reported in
// *bad_row, a device int), leaves the row as it is. ids, scales and bad_row
// are device memory. xa [n, r] receives x[i] @ a_stack[k] (zero where the
// row is left as it is).
template <typename T>
Error BatchedLoraApply(Stream stream, int64_t n, int64_t in, int64_t out,
                       int64_t r, int64_t adapters, const T* y, const T* x,
                       const T* a_stack, const T* b_stack, const int32_t* ids,
                       const T* scales, T* y_out, T* xa, void* workspace,
                       int* bad_row);

size_t BatchedLoraApplyGradWorkspaceBytes(int64_t n, int64_t in, int64_t out,
                                          int64_t r, int64_t adapters);

// The gradients of BatchedLoraApply (the CPU kernel's BatchedLoraApplyGrad):
// dx [n, in] (zero for rows without an adapter), da [adapters, in, r],
// db [adapters, r, out], dscales [adapters], each adapter's from its own rows.
// Ids as in BatchedLoraApply (bad ones reported in *bad_row, never read
// through); scales, dscales and bad_row are device memory. xa and grad_xa:
// as LoraApplyGrad's (a row's grad_xa joins scales[k] (g b_k^T); rows without
// an adapter take none).
template <typename T>
Error BatchedLoraApplyGrad(Stream stream, int64_t n, int64_t in, int64_t out,
                           int64_t r, int64_t adapters, const T* g, const T* x,
                           const T* a_stack, const T* b_stack,
                           const int32_t* ids, const T* scales, T* dx, T* da,
                           T* db, T* dscales, void* workspace, int* bad_row,
                           const T* xa = nullptr, const T* grad_xa = nullptr);

}  // namespace gpu
}  // namespace tf_lora

#endif  // TF_LORA_CORE_KERNELS_LORA_GPU_H_
