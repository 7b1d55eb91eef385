// Tests of the CPU functors of lora.h against a naive double-precision reference.
// Self-contained (no gtest offline): prints one line per case and exits non-zero on any failure.

#define EIGEN_USE_THREADS

#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "core/kernels/lora.h"
#include "unsupported/Eigen/CXX11/Tensor"

namespace tf_lora {
namespace {

int failures = 0;

template <typename T>
std::vector<T> Random(int64_t n, std::mt19937* rng) {
  std::uniform_real_distribution<float> dist(-1.f, 1.f);
  std::vector<T> v(n);
  for (auto& x : v) x = static_cast<T>(dist(*rng));
  return v;
}

template <typename T>
void CheckMerge(const Eigen::ThreadPoolDevice& d, const char* type, int64_t in, int64_t out,
                int64_t r, bool in_place, double tol) {
  std::mt19937 rng(in * 1000003 + out * 101 + r);
  std::vector<T> w = Random<T>(in * out, &rng), a = Random<T>(in * r, &rng),
                 b = Random<T>(r * out, &rng);
  const T scale = static_cast<T>(0.75f);
  const std::vector<T> w0 = w;
  std::vector<T> merged(in * out, static_cast<T>(-7.f));
  T* result = in_place ? w.data() : merged.data();
  functor::LoraMerge<Eigen::ThreadPoolDevice, T>()(d, in, out, r, w.data(), a.data(), b.data(),
                                                   scale, result);
  double max_err = 0;
  for (int64_t i = 0; i < in; ++i) {
    for (int64_t j = 0; j < out; ++j) {
      double ref = static_cast<double>(w0[i * out + j]);
      for (int64_t k = 0; k < r; ++k) {
        ref += static_cast<double>(scale) * static_cast<double>(a[i * r + k]) *
               static_cast<double>(b[k * out + j]);
      }
      // Relative to the value: the output's own rounding dominates for half types.
      const double err = std::abs(static_cast<double>(result[i * out + j]) - ref) / (1 + std::abs(ref));
      if (!(err <= max_err)) max_err = err;  // NaN propagates into max_err.
    }
  }
  const bool ok = max_err <= tol;
  failures += !ok;
  std::printf("%s LoraMerge<%s> in=%lld out=%lld r=%lld%s max_err=%.3g\n", ok ? "PASS" : "FAIL",
              type, static_cast<long long>(in), static_cast<long long>(out),
              static_cast<long long>(r), in_place ? " in-place" : "", max_err);
}

template <typename T>
void CheckAllShapes(const Eigen::ThreadPoolDevice& d, const char* type, double tol) {
  // Covers full 4-row blocks and the short last block, full column tiles and the column tail,
  // r = 0 (plain copy), and shapes big enough to be split across threads.
  const int64_t shapes[][3] = {{1, 1, 1},   {3, 5, 2},     {4, 16, 1},   {7, 33, 3},
                               {64, 64, 8}, {130, 70, 16}, {257, 300, 4}, {9, 40, 0},
                               {0, 8, 2},   {8, 0, 2},     {513, 129, 33}};
  for (const auto& s : shapes) {
    CheckMerge<T>(d, type, s[0], s[1], s[2], /*in_place=*/false, tol);
    CheckMerge<T>(d, type, s[0], s[1], s[2], /*in_place=*/true, tol);
  }
}

}  // namespace
}  // namespace tf_lora

int main() {
  Eigen::ThreadPool pool(4);
  Eigen::ThreadPoolDevice device(&pool, 4);
  // Half types: one rounding of the float32 result (2^-11 and 2^-8 relative), plus float32 sums.
  tf_lora::CheckAllShapes<float>(device, "float", 1e-6);
  tf_lora::CheckAllShapes<double>(device, "double", 1e-14);
  tf_lora::CheckAllShapes<Eigen::half>(device, "half", 1e-3);
  tf_lora::CheckAllShapes<Eigen::bfloat16>(device, "bfloat16", 4e-3);
  std::printf("%d failed\n", tf_lora::failures);
  return tf_lora::failures == 0 ? 0 : 1;
}
