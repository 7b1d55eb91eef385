// LoRA op family: the math, as device-templated functors over raw pointers.
//
// No OpKernel and no heavy TensorFlow header here: the glue (lora_kernels.cc)
// checks inputs and allocates, CPU specialisations live in lora_cpu.cc (tested
// alone by lora_cpu_test.cc), and GPU specialisations for Eigen::GpuDevice slot
// in beside them from a .cu.cc.
//
// Layout: row-major matrices, int64 sizes.

#ifndef TF_LORA_CORE_KERNELS_LORA_H_
#define TF_LORA_CORE_KERNELS_LORA_H_

#include <cstdint>

namespace Eigen {
struct ThreadPoolDevice;
struct half;
struct bfloat16;
}  // namespace Eigen

namespace tf_lora {
namespace functor {

// merged[i, j] = w[i, j] + scale * sum_k a[i, k] * b[k, j]
//   w, merged: [in, out]; a: [in, r]; b: [r, out]. merged may alias w (one
//   pass, element by element).
// half and bfloat16 accumulate in float32; r == 0 copies w.
// Each device declares its specialisation below; the primary template is never
// defined.
template <typename Device, typename T>
struct LoraMerge;

template <typename T>
struct LoraMerge<Eigen::ThreadPoolDevice, T> {
  void operator()(const Eigen::ThreadPoolDevice& d, int64_t in, int64_t out,
                  int64_t r, const T* w, const T* a, const T* b, T scale,
                  T* merged) const;
};

// y_out[n, j] = y[n, j] + scale * sum_k (x @ a)[n, k] * b[k, j]
//   y, y_out: [n, out]; x: [n, in]; a: [in, r]; b: [r, out]. y_out may alias
//   y. x @ a ([n, r]) is kept in the accumulation type; y is read and written
//   once, with no [n, out] temporary. xa, when not null, receives x @ a
//   ([n, r], rounded to T) for the gradient.
template <typename Device, typename T>
struct LoraApply;

template <typename T>
struct LoraApply<Eigen::ThreadPoolDevice, T> {
  void operator()(const Eigen::ThreadPoolDevice& d, int64_t n, int64_t in,
                  int64_t out, int64_t r, const T* y, const T* x, const T* a,
                  const T* b, T scale, T* y_out, T* xa = nullptr) const;
};

// Gradients of LoraApply for the upstream gradient g ([n, out]):
//   dx = scale * (g @ b^T) @ a^T          [n, in]
//   da = scale * x^T @ (g @ b^T)          [in, r]
//   db = scale * (x @ a)^T @ g            [r, out]
//   dscale = sum((x @ a) * (g @ b^T))     []  (= sum(g * (x @ a) @ b))
// (dy = g needs no kernel.) One pass over g and x; only [n, r]-sized
// intermediates; results do not depend on the number of threads.
// With xa and grad_xa (both [n, r], or both null): LoraApply's x @ a and the
// gradient for it. grad_xa adds to scale * (g @ b^T) in dx and da; xa stands
// for x @ a where T is its own accumulation type (float, double: the product
// is not computed again; half types compute it in float32, which xa rounded
// to T is not).
template <typename Device, typename T>
struct LoraApplyGrad;

template <typename T>
struct LoraApplyGrad<Eigen::ThreadPoolDevice, T> {
  void operator()(const Eigen::ThreadPoolDevice& d, int64_t n, int64_t in,
                  int64_t out, int64_t r, const T* g, const T* x, const T* a,
                  const T* b, T scale, T* dx, T* da, T* db, T* dscale,
                  const T* xa = nullptr, const T* grad_xa = nullptr) const;
};

// Multi-adapter LoraApply. The `adapters` adapters are stacked along a
// leading axis: a_stack [adapters, in, r], b_stack [adapters, r, out],
// scales [adapters]. Row i of y is updated with the adapter whose index is
// ids[i]: y_out[i] = y[i] + scales[k] * (x[i] @ a_stack[k]) @ b_stack[k] with
// k = ids[i]; k = -1 leaves the row as it is. The caller checks that every id
// lies in [-1, adapters). Rows are grouped by adapter internally; y_out may
// alias y; no [n, out] temporary. xa (may be null) receives each row's
// x[i] @ a_stack[k] ([n, r], zero for id -1).
template <typename Device, typename T>
struct BatchedLoraApply;

template <typename T>
struct BatchedLoraApply<Eigen::ThreadPoolDevice, T> {
  void operator()(const Eigen::ThreadPoolDevice& d, int64_t n, int64_t in,
                  int64_t out, int64_t r, int64_t adapters, const T* y,
                  const T* x, const T* a_stack, const T* b_stack,
                  const int32_t* ids, const T* scales, T* y_out,
                  T* xa = nullptr) const;
};

// Gradients of BatchedLoraApply for upstream gradient g: for each adapter k,
// LoraApplyGrad over the rows with id k gives da_stack[k], db_stack[k],
// dscales[k] and those rows of dx; rows with id -1 get dx = 0. xa and
// grad_xa ([n, r] or null): as LoraApplyGrad's (rows with id -1: unread).
template <typename Device, typename T>
struct BatchedLoraApplyGrad;

template <typename T>
struct BatchedLoraApplyGrad<Eigen::ThreadPoolDevice, T> {
  void operator()(const Eigen::ThreadPoolDevice& d, int64_t n, int64_t in,
                  int64_t out, int64_t r, int64_t adapters, const T* g,
                  const T* x, const T* a_stack, const T* b_stack,
                  const int32_t* ids, const T* scales, T* dx, T* da_stack,
                  T* db_stack, T* dscales, const T* xa = nullptr,
                  const T* grad_xa = nullptr) const;
};

// Instantiated in lora_cpu.cc for float, double, Eigen::half and
// Eigen::bfloat16.
#define TF_LORA_DECLARE_CPU(T)                                         \
  extern template struct LoraMerge<Eigen::ThreadPoolDevice, T>;        \
  extern template struct LoraApply<Eigen::ThreadPoolDevice, T>;        \
  extern template struct LoraApplyGrad<Eigen::ThreadPoolDevice, T>;    \
  extern template struct BatchedLoraApply<Eigen::ThreadPoolDevice, T>; \
  extern template struct BatchedLoraApplyGrad<Eigen::ThreadPoolDevice, T>;
TF_LORA_DECLARE_CPU(float)
TF_LORA_DECLARE_CPU(double)
TF_LORA_DECLARE_CPU(Eigen::half)
TF_LORA_DECLARE_CPU(Eigen::bfloat16)
#undef TF_LORA_DECLARE_CPU

// The CPU code the functors run: "avx2" (AVX2 + FMA + F16C) or "baseline",
// chosen once per process from the CPU and TF_LORA_CPU_ISA=baseline.
const char* CpuCodePath();

}  // namespace functor
}  // namespace tf_lora

#endif  // TF_LORA_CORE_KERNELS_LORA_H_
