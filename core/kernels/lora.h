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

// Instantiated in lora_cpu.cc for float, double, Eigen::half and
// Eigen::bfloat16.
extern template struct LoraMerge<Eigen::ThreadPoolDevice, float>;
extern template struct LoraMerge<Eigen::ThreadPoolDevice, double>;
extern template struct LoraMerge<Eigen::ThreadPoolDevice, Eigen::half>;
extern template struct LoraMerge<Eigen::ThreadPoolDevice, Eigen::bfloat16>;

}  // namespace functor
}  // namespace tf_lora

#endif  // TF_LORA_CORE_KERNELS_LORA_H_
