// C++ harness behind the lora_merge figures of benchmarks/RESULTS.md ("The
// write-allocate of out-of-place outputs", "Full-row B panels"): LoraMerge
// 4096 x 4096 out of place and in place on 2 threads, against a copy-and-add
// pass over w.
//
//   bazel run //benchmarks/harness:lora_merge -- 16   # the rank
#define EIGEN_USE_THREADS
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "benchmarks/harness/timing.h"
#include "core/kernels/lora.h"
#include "unsupported/Eigen/CXX11/Tensor"
using tf_lora_bench::Now;
int main(int argc, char** argv) {
  const int64_t in = 4096, out = 4096, r = argc > 1 ? atoi(argv[1]) : 16;
  Eigen::ThreadPool pool(2);
  Eigen::ThreadPoolDevice d(&pool, 2);
  auto alloc = [](size_t n) {
    float* p = (float*)aligned_alloc(64, n * 4);
    std::memset(p, 0, n * 4);
    return p;
  };
  float *w = alloc(in * out), *o = alloc(in * out), *o2 = alloc(in * out),
        *a = alloc(in * r), *b = alloc(r * out);
  std::mt19937 g(1);
  std::normal_distribution<float> nd;
  for (int64_t i = 0; i < in * out; ++i) w[i] = nd(g);
  for (int64_t i = 0; i < in * r; ++i) a[i] = nd(g);
  for (int64_t i = 0; i < r * out; ++i) b[i] = nd(g);
  tf_lora::functor::LoraMerge<Eigen::ThreadPoolDevice, float> merge;
  std::vector<double> tm, ti, ts;
  for (int it = 0; it < 40; ++it) {
    double t0 = Now();
    merge(d, in, out, r, w, a, b, 0.5f, o);
    double t1 = Now();
    merge(d, in, out, r, o2, a, b, 0.5f, o2);
    double t2 = Now();
    d.parallelFor(in, Eigen::TensorOpCost(out * 4, out * 4, out),
                  [&](Eigen::Index s, Eigen::Index e) {
                    for (int64_t i = s * out; i < e * out; ++i)
                      o2[i] = w[i] + 0.f;
                  });
    double t3 = Now();
    tm.push_back(t1 - t0);
    ti.push_back(t2 - t1);
    ts.push_back(t3 - t2);
  }
  const auto med = tf_lora_bench::MedianMs;
  printf("r=%ld out-of-place %.2f ms  in-place %.2f ms  stream %.2f ms\n", r,
         med(tm), med(ti), med(ts));
}
