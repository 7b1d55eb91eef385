// C++ harness behind the LoraApplyGrad figures of benchmarks/RESULTS.md: the
// fused gradient (dx, da, db, dscale) at N x 4096 -> 4096 on 2 threads, beside
// a streaming pass that reads x and g and writes dx (the op's traffic bound).
// The gradient runs twice per round: computing x @ a itself, and given the
// forward's x @ a with a zero gradient for it (as TensorFlow calls it).
// With a number of adapters, BatchedLoraApplyGrad instead, each row's adapter
// drawn at random.
//
//   bazel run //benchmarks/harness:lora_grad -- 16 4096   # rank, rows
//   bazel run //benchmarks/harness:lora_grad -- 16 1024 30 8   # ..., calls,
//   adapters
#define EIGEN_USE_THREADS
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "benchmarks/harness/timing.h"
#include "core/kernels/lora.h"
#include "unsupported/Eigen/CXX11/Tensor"
using tf_lora_bench::Now;
int main(int argc, char** argv) {
  const int64_t r = argc > 1 ? atoi(argv[1]) : 16;
  const int64_t n = argc > 2 ? atoi(argv[2]) : 4096;
  const int iters = argc > 3 ? atoi(argv[3]) : 30;
  const int64_t adapters = argc > 4 ? atoi(argv[4]) : 0;
  const int64_t stacks = std::max<int64_t>(1, adapters);
  const int64_t in = 4096, out = 4096;
  Eigen::ThreadPool pool(2);
  Eigen::ThreadPoolDevice d(&pool, 2);
  auto alloc = [](size_t count) {
    float* p = static_cast<float*>(aligned_alloc(64, count * 4));
    std::memset(p, 0, count * 4);
    return p;
  };
  float *x = alloc(n * in), *g = alloc(n * out), *dx = alloc(n * in),
        *a = alloc(stacks * in * r), *b = alloc(stacks * r * out),
        *da = alloc(stacks * in * r), *db = alloc(stacks * r * out),
        *scales = alloc(stacks), *dscales = alloc(stacks);
  std::mt19937 gen(1);
  std::normal_distribution<float> nd;
  for (int64_t i = 0; i < n * in; ++i) x[i] = nd(gen);
  for (int64_t i = 0; i < n * out; ++i) g[i] = nd(gen);
  for (int64_t i = 0; i < stacks * in * r; ++i) a[i] = nd(gen);
  for (int64_t i = 0; i < stacks * r * out; ++i) b[i] = nd(gen);
  std::vector<int32_t> ids(n);
  for (auto& id : ids) id = static_cast<int32_t>(gen() % stacks);
  for (int64_t k = 0; k < stacks; ++k) scales[k] = 0.5f;
  tf_lora::functor::LoraApplyGrad<Eigen::ThreadPoolDevice, float> grad;
  tf_lora::functor::BatchedLoraApplyGrad<Eigen::ThreadPoolDevice, float>
      batched_grad;
  // The forward's x @ a (LoraApply's second output), and its zero gradient.
  float *xa = alloc(n * r), *grad_xa = alloc(n * r), *y = alloc(n * out);
  if (adapters == 0) {
    tf_lora::functor::LoraApply<Eigen::ThreadPoolDevice, float>()(
        d, n, in, out, r, y, x, a, b, 0.5f, y, xa);
  }
  std::vector<double> tg, tsaved, ts;
  for (int it = 0; it < iters; ++it) {
    double t0 = Now();
    if (adapters > 0) {
      batched_grad(d, n, in, out, r, adapters, g, x, a, b, ids.data(), scales,
                   dx, da, db, dscales);
    } else {
      grad(d, n, in, out, r, g, x, a, b, 0.5f, dx, da, db, dscales);
    }
    double t1 = Now();
    if (adapters == 0) {
      grad(d, n, in, out, r, g, x, a, b, 0.5f, dx, da, db, dscales, xa,
           grad_xa);
    }
    double t1b = Now();
    d.parallelFor(n, Eigen::TensorOpCost(2 * in * 4, in * 4, in),
                  [&](Eigen::Index s, Eigen::Index e) {
                    for (int64_t i = s * in; i < e * in; ++i)
                      dx[i] = x[i] + g[i];
                  });
    double t2 = Now();
    tg.push_back(t1 - t0);
    tsaved.push_back(t1b - t1);
    ts.push_back(t2 - t1b);
  }
  const auto med = tf_lora_bench::MedianMs;
  // Five products of n * r * 4096 multiply-adds: x @ a, g @ b^T, dx, da, db.
  const double flops = 2.0 * 5 * n * r * in;
  printf(
      "r=%ld N=%ld adapters=%ld grad %.2f ms (%.0f GFLOP/s)  stream x+g->dx "
      "%.2f ms",
      r, n, adapters, med(tg), flops / med(tg) / 1e6, med(ts));
  if (adapters == 0) {
    printf("  grad given x @ a %.2f ms (%.2fx)", med(tsaved),
           med(tg) / med(tsaved));
  }
  printf("\n");
}
