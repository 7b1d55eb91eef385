// C++ harness behind the "huge pages" figures of benchmarks/RESULTS.md: a
// training pull of 65,536 Zipf(1.2) ids over a 1M-key table (dim 16,
// Adagrad) against a plain gather of the same rows from a dense array,
// alternating, with a 32 MB write between rounds to evict the caches.
//
//   .venv/bin/python -c "import numpy as np; r = np.random.default_rng(0); \
//     ((r.zipf(1.2, 65536) - 1) %
//     1000000).astype(np.int64).tofile('/tmp/ids.bin')"
//   bazel run //benchmarks/harness:sparse_pull -- 300 /tmp/ids.bin
//   (TF_LORA_HUGE_PAGES=0 for small pages)
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "benchmarks/harness/timing.h"
#include "core/kernels/sparse_table.h"
using namespace tf_lora::sparse;
using tf_lora_bench::Now;
int main(int argc, char** argv) {
  const int64_t keys = 1000000, dim = 16;
  std::vector<int64_t> ids(65536);
  FILE* f = fopen(argc > 2 ? argv[2] : "ids.bin", "rb");
  fread(ids.data(), 8, ids.size(), f);
  fclose(f);
  const int64_t n = ids.size();
  Config c;
  c.dim = dim;
  c.optimizer.kind = Optimizer::Kind::kAdagrad;
  Table t(c);
  Table::Contents in;
  for (int64_t k = 0; k < keys; ++k) in.keys.push_back(k);
  in.values.resize(keys * dim);
  for (auto& v : in.values) v = (rand() % 1000) * 1e-3f;
  in.slots.assign(keys * dim, 0.1f);
  in.update_counts.assign(keys, 0);
  in.last_steps.assign(keys, 0);
  t.Import(in, 0);
  float* dense = static_cast<float*>(aligned_alloc(64, keys * dim * 4));
  std::memcpy(dense, in.values.data(), keys * dim * 4);
  ParallelFor pf = [](int64_t n, double,
                      std::function<void(int64_t, int64_t)> fn) {
    std::thread th([&] { fn(n / 2, n); });
    fn(0, n / 2);
    th.join();
  };
  std::vector<float> out(n * dim), out2(n * dim);
  auto gather = [&] {
    pf(n, 0, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        std::memcpy(&out2[i * dim], dense + ids[i] * dim, dim * 4);
    });
  };
  auto pull = [&] { t.Pull(ids.data(), n, true, out.data(), pf); };
  pull();
  gather();
  if (std::memcmp(out.data(), out2.data(), n * dim * 4)) {
    printf("MISMATCH\n");
    return 1;
  }
  // A third working set that evicts the others, like the hash table in the
  // Python bench.
  std::vector<float> junk(8 << 20);
  std::vector<double> tp, tg;
  const int rounds = argc > 1 ? atoi(argv[1]) : 200;
  for (int r = 0; r < rounds; ++r) {
    double t0 = Now();
    pull();
    double t1 = Now();
    gather();
    double t2 = Now();
    for (size_t i = 0; i < junk.size(); i += 16) junk[i] += 1;
    tp.push_back(t1 - t0);
    tg.push_back(t2 - t1);
  }
  std::sort(tp.begin(), tp.end());
  std::sort(tg.begin(), tg.end());
  printf("pull %.3f ms  gather %.3f ms  ratio(gather/pull) %.2f\n",
         tp[tp.size() / 2] * 1e3, tg[tg.size() / 2] * 1e3,
         tg[tg.size() / 2] / tp[tp.size() / 2]);
}
