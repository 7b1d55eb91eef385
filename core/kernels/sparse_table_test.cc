// Tests of the sparse table alone (no TensorFlow runtime).

#include "core/kernels/sparse_table.h"

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iterator>
#include <limits>
#include <new>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "core/kernels/worker_exceptions.h"
#include "gtest/gtest.h"

namespace tf_lora {
namespace sparse {
namespace {

// Splits [0, n) over 4 threads.
void Threads(int64_t n, double, std::function<void(int64_t, int64_t)> fn) {
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back(fn, n * t / 4, n * (t + 1) / 4);
  }
  for (auto& t : threads) t.join();
}

Config MakeConfig(Optimizer::Kind opt, Initializer::Kind init, int64_t dim) {
  Config c;
  c.dim = dim;
  c.optimizer.kind = opt;
  c.initializer.kind = init;
  c.initializer.a = 0.f;
  c.initializer.b = 1.f;
  c.initializer.seed = 1234;
  return c;
}

TEST(SparseTable, PullInsertsAndInitIsPerKey) {
  const int64_t dim = 7;
  Table t1(MakeConfig(Optimizer::Kind::kSgd, Initializer::Kind::kNormal, dim));
  Table t2(MakeConfig(Optimizer::Kind::kSgd, Initializer::Kind::kNormal, dim));
  std::vector<int64_t> ids(5000);
  std::mt19937_64 rng(1);
  for (auto& id : ids) id = static_cast<int64_t>(rng() % 3000) - 1500;
  std::vector<int64_t> reversed(ids.rbegin(), ids.rend());
  std::vector<float> v1(ids.size() * dim), v2(ids.size() * dim);
  t1.Pull(ids.data(), ids.size(), true, v1.data(), Threads);
  t2.Pull(reversed.data(), reversed.size(), true, v2.data(), Threads);
  bool same = true;
  for (size_t i = 0; i < ids.size(); ++i) {
    const size_t j = ids.size() - 1 - i;  // reversed[j] == ids[i]
    same &= std::equal(v1.begin() + i * dim, v1.begin() + (i + 1) * dim,
                       v2.begin() + j * dim);
  }
  EXPECT_TRUE(same)
      << "initial rows are a function of (seed, key), not of order";
  EXPECT_TRUE(t1.Size() == t2.Size() && t1.Size() > 2000 && t1.Size() <= 3000)
      << "training pulls insert each distinct key once";
  double sum = 0, sq = 0;
  for (float x : v1) sum += x, sq += x * x;
  const double mean = sum / v1.size(), var = sq / v1.size() - mean * mean;
  EXPECT_TRUE(std::abs(mean) < 0.05 && std::abs(var - 1) < 0.1)
      << "normal initializer has mean 0 and variance 1";
}

TEST(SparseTable, InferencePullInsertsNothing) {
  Table t(MakeConfig(Optimizer::Kind::kSgd, Initializer::Kind::kUniform, 4));
  const int64_t known = 42, unknown = 43;
  std::vector<float> v(4);
  t.Pull(&known, 1, true, v.data(), Threads);
  const std::vector<float> row = v;
  const int64_t ids[2] = {unknown, known};
  std::vector<float> out(8, -1.f);
  t.Pull(ids, 2, false, out.data(), Threads);
  EXPECT_TRUE(t.Size() == 1) << "inference pull inserts nothing";
  EXPECT_TRUE(std::all_of(out.begin(), out.begin() + 4,
                          [](float x) { return x == 0; }) &&
              std::equal(row.begin(), row.end(), out.begin() + 4))
      << "inference pull: unknown ids read zeros, known ids their row";
}

TEST(SparseTable, SgdSumsDuplicatesExactly) {
  Table t(MakeConfig(Optimizer::Kind::kSgd, Initializer::Kind::kZeros, 3));
  const int64_t ids[5] = {7, 9, 7, 7, 11};
  const float grads[15] = {1, 2, 3, 10, 20, 30, 1, 2, 3, 1, 2, 3, 5, 5, 5};
  t.Push(ids, 5, grads, 0.5f, Threads);
  std::vector<float> v(9);
  const int64_t q[3] = {7, 9, 11};
  t.Pull(q, 3, false, v.data(), Threads);
  const std::vector<float> want = {-1.5f, -3,    -4.5f, -5,   -10,
                                   -15,   -2.5f, -2.5f, -2.5f};
  EXPECT_TRUE(v == want) << "SGD: duplicates summed, one update per key";
  const Table::Contents c = t.Export();
  int64_t count7 = -1;
  for (size_t i = 0; i < c.keys.size(); ++i) {
    if (c.keys[i] == 7) count7 = c.update_counts[i];
  }
  EXPECT_TRUE(count7 == 1 && t.step() == 1)
      << "a push counts one update per unique key";
}

TEST(SparseTable, Adagrad) {
  Config config =
      MakeConfig(Optimizer::Kind::kAdagrad, Initializer::Kind::kZeros, 2);
  config.optimizer.initial_accumulator = 0.1f;
  config.optimizer.epsilon = 1e-7f;
  Table t(config);
  const int64_t ids[2] = {5, 5};
  const float grads[4] = {1, -2, 2, 1};  // sums to {3, -1}
  t.Push(ids, 2, grads, 0.1f, Threads);
  t.Push(ids, 1, grads, 0.1f, Threads);  // {1, -2}
  double w[2] = {0, 0}, acc[2] = {0.1, 0.1};
  const double g1[2] = {3, -1}, g2[2] = {1, -2};
  for (const double* g : {g1, g2}) {
    for (int j = 0; j < 2; ++j) {
      acc[j] += g[j] * g[j];
      w[j] -= 0.1 * g[j] / std::sqrt(acc[j] + 1e-7);
    }
  }
  const Table::Contents c = t.Export();
  EXPECT_TRUE(c.keys.size() == 1 && std::abs(c.values[0] - w[0]) < 1e-6 &&
              std::abs(c.values[1] - w[1]) < 1e-6 &&
              std::abs(c.slots[0] - acc[0]) < 1e-5 &&
              std::abs(c.slots[1] - acc[1]) < 1e-5 && c.update_counts[0] == 2 &&
              c.last_steps[0] == 2)
      << "Adagrad matches the Keras 3 update, slots and metadata exported";
}

TEST(SparseTable, ImportRoundTripAndRejectsDuplicates) {
  Table t(
      MakeConfig(Optimizer::Kind::kAdagrad, Initializer::Kind::kUniform, 5));
  std::vector<int64_t> ids(3000);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = i * 7919;
  std::vector<float> grads(ids.size() * 5, 0.25f);
  t.Push(ids.data(), ids.size(), grads.data(), 0.1f, Threads);
  const Table::Contents before = t.Export();
  Table u(t.config());
  EXPECT_TRUE(u.Import(before, t.step()).empty())
      << "import of an export succeeds";
  const Table::Contents after = u.Export();
  std::vector<size_t> a(before.keys.size()), b(after.keys.size());
  bool same = before.keys.size() == after.keys.size() && u.step() == t.step();
  // Same contents key by key (the order may differ).
  std::vector<float> va(ids.size() * 5), vb(ids.size() * 5);
  t.Pull(ids.data(), ids.size(), false, va.data(), Threads);
  u.Pull(ids.data(), ids.size(), false, vb.data(), Threads);
  same &= va == vb;
  EXPECT_TRUE(same) << "export -> import round trip is exact";
  Table::Contents dup = before;
  dup.keys[1] = dup.keys[0];
  const std::string error = u.Import(dup, 99);
  std::vector<float> vc(ids.size() * 5);
  u.Pull(ids.data(), ids.size(), false, vc.data(), Threads);
  EXPECT_TRUE(!error.empty() && vc == vb && u.step() == t.step())
      << "import with a duplicate key fails and leaves the table as it was";
}

TEST(SparseTable, ImportRefusesWhatAPushWouldTurnIntoNaN) {
  const int64_t dim = 3;
  for (const auto kind : {Optimizer::Kind::kSgd, Optimizer::Kind::kAdagrad,
                          Optimizer::Kind::kAdam, Optimizer::Kind::kFtrl}) {
    Table t(MakeConfig(kind, Initializer::Kind::kUniform, dim));
    std::vector<int64_t> ids = {5, -7, 11};
    std::vector<float> grads(ids.size() * dim, 0.5f);
    t.Push(ids.data(), ids.size(), grads.data(), 0.1f, Threads);
    const Table::Contents good = t.Export();
    std::vector<float> before(ids.size() * dim), after(ids.size() * dim);
    t.Pull(ids.data(), ids.size(), false, before.data(), Threads);
    const auto refused = [&](Table::Contents c, int64_t step,
                             const char* what) {
      const std::string error = t.Import(c, step);
      t.Pull(ids.data(), ids.size(), false, after.data(), Threads);
      EXPECT_TRUE(!error.empty() && after == before)
          << what << " is refused (" << error << ") and the table kept";
    };
    Table::Contents bad = good;
    bad.values[4] = std::nanf("");
    refused(bad, t.step(), "a NaN value");
    bad = good;
    bad.values[0] = INFINITY;
    refused(bad, t.step(), "an infinite value");
    bad = good;
    bad.update_counts[1] = -1;
    refused(bad, t.step(), "a negative update count");
    bad.update_counts[1] = std::numeric_limits<int64_t>::max();
    refused(bad, t.step(), "an update count the next push would overflow");
    refused(good, -1, "a negative step");
    refused(good, std::numeric_limits<int64_t>::max(),
            "a step that would overflow");
    if (kind == Optimizer::Kind::kSgd) continue;
    bad = good;
    bad.slots[2] = std::nanf("");
    refused(bad, t.step(), "a NaN slot");
    // Adagrad's and FTRL's accumulator is the first slot, Adam's v the second.
    const int64_t acc = kind == Optimizer::Kind::kAdam ? dim : 0;
    const int64_t width = good.slots.size() / good.keys.size();
    bad = good;
    bad.slots[width + acc + 1] = -1.f;
    refused(bad, t.step(), "a negative accumulator");
    EXPECT_TRUE(t.Import(good, t.step()).empty()) << "the export itself";
  }
}

TEST(SparseTable, ConcurrentPushesLoseNothing) {
  Table t(MakeConfig(Optimizer::Kind::kSgd, Initializer::Kind::kZeros, 2));
  const int kThreads = 4, kPushes = 200, kIds = 64;
  std::vector<std::thread> threads;
  for (int th = 0; th < kThreads; ++th) {
    threads.emplace_back([&t, th] {
      std::mt19937_64 rng(th);
      for (int p = 0; p < kPushes; ++p) {
        std::vector<int64_t> ids(kIds);
        for (auto& id : ids) id = rng() % 500;
        std::vector<float> grads(kIds * 2, 1.f);
        t.Push(ids.data(), kIds, grads.data(), 1.f, Threads);
        std::vector<float> v(kIds * 2);
        t.Pull(ids.data(), kIds, true, v.data(), Threads);
      }
    });
  }
  for (auto& th : threads) th.join();
  const Table::Contents c = t.Export();
  double total = 0;
  int64_t updates = 0;
  for (float v : c.values) total += v;
  for (int64_t u : c.update_counts) updates += u;
  // Every pushed gradient of 1 moved its value by exactly -1.
  EXPECT_TRUE(total == -2.0 * kThreads * kPushes * kIds &&
              t.step() == kThreads * kPushes && updates > 0)
      << "concurrent pushes and pulls: exact SGD sums, no lost inserts";
}

// Removal against a reference set, through many inserts and removals, so
// backward-shift deletion and row moves meet every case (wrap-around probes,
// moved rows, emptied blocks).
TEST(SparseTable, RemoveAndEvict) {
  Table t(MakeConfig(Optimizer::Kind::kSgd, Initializer::Kind::kUniform, 3));
  std::mt19937_64 rng(5);
  std::vector<int64_t> ids(20000);
  for (auto& id : ids) id = rng() % 30000;
  std::vector<float> before(ids.size() * 3);
  t.Pull(ids.data(), ids.size(), true, before.data(), Threads);
  std::vector<int64_t> doomed;
  for (int64_t k = 0; k < 30000; k += 3) doomed.push_back(k);
  std::vector<int64_t> present(ids);
  std::sort(present.begin(), present.end());
  present.erase(std::unique(present.begin(), present.end()), present.end());
  const int64_t expected = std::count_if(present.begin(), present.end(),
                                         [](int64_t k) { return k % 3 == 0; });
  const int64_t removed = t.Remove(doomed.data(), doomed.size());
  bool ok = removed == expected &&
            t.Size() == static_cast<int64_t>(present.size()) - expected;
  std::vector<float> after(ids.size() * 3);
  t.Pull(ids.data(), ids.size(), false, after.data(), Threads);
  for (size_t i = 0; i < ids.size(); ++i) {
    for (int j = 0; j < 3; ++j) {
      const float want = ids[i] % 3 == 0 ? 0.f : before[i * 3 + j];
      ok &= after[i * 3 + j] == want;
    }
  }
  EXPECT_TRUE(ok)
      << "remove: removed keys read zeros, every other key keeps its row";
  // Evict: keys pushed twice stay, the rest go (min_update_count 2).
  const int64_t keep[3] = {1, 2, 4};
  const float g[9] = {1, 1, 1, 1, 1, 1, 1, 1, 1};
  t.Push(keep, 3, g, 0.1f, Threads);
  t.Push(keep, 3, g, 0.1f, Threads);
  const int64_t size_before = t.Size();
  const int64_t evicted = t.Evict(/*min_update_count=*/2, /*max_age=*/-1);
  EXPECT_TRUE(t.Size() == 3 && evicted == size_before - 3)
      << "evict by update count keeps the keys updated often enough";
  t.Push(keep, 1, g, 0.1f, Threads);  // key 1 is fresh; 2 and 4 one step older
  EXPECT_TRUE(t.Evict(0, /*max_age=*/0) == 2 && t.Size() == 1)
      << "evict by age removes keys not updated within max_age steps";
}

// The pool: aligned, disjoint blocks of every kind (heap, slab, own mapping);
// memory goes back once freed; huge pages asked for past the threshold.
TEST(SparseTable, PagePool) {
  PagePool pool;
  const size_t sizes[] = {1000,      PagePool::kMinPooled,
                          64 << 10,  (64 << 10) + 100,
                          512 << 10, 3 << 20};
  struct Block {
    unsigned char* p;
    size_t bytes;
    unsigned char fill;
  };
  std::vector<Block> blocks;
  bool aligned = true;
  for (int round = 0; round < 40; ++round) {
    for (size_t bytes : sizes) {
      auto* p = static_cast<unsigned char*>(pool.Allocate(bytes));
      aligned &= reinterpret_cast<uintptr_t>(p) % 64 == 0;
      const unsigned char fill = static_cast<unsigned char>(blocks.size());
      std::fill_n(p, bytes, fill);
      blocks.push_back({p, bytes, fill});
    }
  }
  bool intact = true;
  for (const Block& b : blocks) {
    intact &= std::all_of(b.p, b.p + b.bytes,
                          [&](unsigned char c) { return c == b.fill; });
  }
  EXPECT_TRUE(aligned && intact)
      << "page pool: 64-byte aligned, disjoint blocks";
  EXPECT_TRUE(pool.huge() == (std::getenv("TF_LORA_HUGE_PAGES") == nullptr))
      << "page pool: asks for huge pages once it holds enough chunks";
  // Free every other block of each size, reuse the room, then free all.
  const size_t kinds = std::size(sizes);
  const auto freed = [&](size_t i) { return (i / kinds) % 2 == 0; };
  for (size_t i = 0; i < blocks.size(); ++i) {
    if (freed(i)) pool.Free(blocks[i].p, blocks[i].bytes);
  }
  const int chunks = pool.slab_chunks();
  for (size_t i = 0; i < blocks.size(); ++i) {
    if (!freed(i)) continue;
    blocks[i].p = static_cast<unsigned char*>(pool.Allocate(blocks[i].bytes));
  }
  EXPECT_TRUE(pool.slab_chunks() == chunks)
      << "page pool: freed slots are reused";
  for (const Block& b : blocks) pool.Free(b.p, b.bytes);
  // At most one spare chunk per slab size is kept.
  EXPECT_TRUE(pool.slab_chunks() <= 4 && pool.large_bytes() == 0)
      << "page pool: memory goes back to the system once freed";
}

// A table past the pool's huge-page threshold (250K keys x 128-byte rows):
// rows and indexes keep their contents through growth, removal and eviction,
// and the memory goes back when the keys go.
TEST(SparseTable, LargeTable) {
  const int64_t dim = 16;
  Table t(
      MakeConfig(Optimizer::Kind::kAdagrad, Initializer::Kind::kNormal, dim));
  std::vector<int64_t> ids(250000);
  std::mt19937_64 rng(9);
  for (size_t i = 0; i < ids.size(); ++i) {
    ids[i] = static_cast<int64_t>(i) * 1000003 + (rng() % 1000);  // distinct
  }
  std::vector<float> first(ids.size() * dim), again(ids.size() * dim);
  t.Pull(ids.data(), ids.size(), true, first.data(), Threads);
  t.Pull(ids.data(), ids.size(), false, again.data(), Threads);
  const bool huge = t.pool().huge();
  EXPECT_TRUE(t.Size() == 250000 && first == again &&
              huge == (std::getenv("TF_LORA_HUGE_PAGES") == nullptr))
      << "large table: every key once, rows read back exactly";
  std::vector<int64_t> doomed;
  for (size_t i = 0; i < ids.size(); i += 3) doomed.push_back(ids[i]);
  const int chunks = t.pool().slab_chunks();
  t.Remove(doomed.data(), doomed.size());
  t.Pull(ids.data(), ids.size(), false, again.data(), Threads);
  bool ok = t.Size() == 250000 - static_cast<int64_t>(doomed.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    for (int64_t j = 0; j < dim; ++j) {
      ok &= again[i * dim + j] == (i % 3 == 0 ? 0.f : first[i * dim + j]);
    }
  }
  EXPECT_TRUE(ok) << "large table: removal keeps the other rows";
  // As many new keys as went: the freed blocks take them, no new chunks.
  for (int64_t& id : doomed) id = -id - 1;
  std::vector<float> fresh(doomed.size() * dim);
  t.Pull(doomed.data(), doomed.size(), true, fresh.data(), Threads);
  EXPECT_TRUE(t.Size() == 250000 && t.pool().slab_chunks() <= chunks)
      << "large table: blocks freed by removal are reused";
  const int64_t size = t.Size();
  EXPECT_TRUE(t.Evict(/*min_update_count=*/1, -1) == size && t.Size() == 0)
      << "large table: eviction empties it";
  EXPECT_TRUE(t.pool().slab_chunks() <= 4 && t.pool().large_bytes() == 0)
      << "large table: an empty table gives its memory back";
}

// The process's address space in bytes (first field of /proc/self/statm).
int64_t AddressSpaceBytes() {
  FILE* f = std::fopen("/proc/self/statm", "r");
  long pages = 0;
  if (f == nullptr || std::fscanf(f, "%ld", &pages) != 1) pages = 0;
  if (f != nullptr) std::fclose(f);
  return static_cast<int64_t>(pages) * sysconf(_SC_PAGESIZE);
}

// Pushes of new keys under an address-space limit until memory runs out: the
// std::bad_alloc reaches the caller (here, and through a worker thread in the
// kernels, which turn it into ResourceExhausted), and the table stays whole:
// its size matches its contents, and the keys it had keep their rows.
TEST(SparseTable, OutOfMemoryLeavesTableWhole) {
  const int64_t dim = 32;
  Table t(MakeConfig(Optimizer::Kind::kSgd, Initializer::Kind::kNormal, dim));
  const auto serial = [](int64_t n, double,
                         std::function<void(int64_t, int64_t)> fn) {
    fn(0, n);
  };
  std::vector<int64_t> old_ids(1000);
  for (int64_t i = 0; i < 1000; ++i) old_ids[i] = i * 7919;
  std::vector<float> grads(old_ids.size() * dim, 0.5f);
  t.Push(old_ids.data(), old_ids.size(), grads.data(), 0.1f, serial);
  std::vector<float> before(old_ids.size() * dim);
  t.Pull(old_ids.data(), old_ids.size(), false, before.data(), serial);
  // Batches of new keys, allocated before the limit goes on.
  const int64_t batch = 1 << 16;
  std::vector<int64_t> ids(batch);
  std::vector<float> batch_grads(batch * dim, 1.f);
  rlimit old_limit;
  getrlimit(RLIMIT_AS, &old_limit);
  rlimit limit = old_limit;
  limit.rlim_cur = AddressSpaceBytes() + (256 << 20);
  bool threw = false;
  if (setrlimit(RLIMIT_AS, &limit) == 0) {
    try {
      for (int64_t b = 0; b < 64; ++b) {  // 4M keys x 128 bytes: past 256 MiB
        for (int64_t i = 0; i < batch; ++i) ids[i] = -1 - (b * batch + i);
        t.Push(ids.data(), batch, batch_grads.data(), 0.1f, serial);
      }
    } catch (const std::bad_alloc&) {
      threw = true;
    }
    setrlimit(RLIMIT_AS, &old_limit);
  }
  EXPECT_TRUE(threw)
      << "out of memory: a push past the limit throws std::bad_alloc";
  std::vector<float> after(old_ids.size() * dim);
  t.Pull(old_ids.data(), old_ids.size(), false, after.data(), serial);
  const Table::Contents c = t.Export();
  bool rows_match = true;
  std::vector<float> row(dim);
  for (size_t k = 0; k < c.keys.size(); k += 97) {  // a sample of the keys
    t.Pull(&c.keys[k], 1, false, row.data(), serial);
    rows_match &=
        std::equal(row.begin(), row.end(), c.values.begin() + k * dim);
  }
  EXPECT_TRUE(before == after &&
              static_cast<int64_t>(c.keys.size()) == t.Size() && rows_match)
      << "out of memory: the table stays whole (old rows, size, contents)";
  // Memory is back: the table grows again.
  for (int64_t i = 0; i < batch; ++i) ids[i] = (int64_t{1} << 40) + i;
  t.Push(ids.data(), batch, batch_grads.data(), 0.1f, serial);
  EXPECT_TRUE(t.Size() == static_cast<int64_t>(c.keys.size()) + batch)
      << "out of memory: pushes work again once memory is available";
}

// dim * (1 + slots) once wrapped past int64: the block-size loop never ended
// (sgd) and export asked for a negative slot width (adam). Check() bounds dim;
// the widest table allowed works.
TEST(SparseTable, DimBounds) {
  for (int64_t dim : {int64_t{0}, Config::kMaxDim + 1, int64_t{1} << 60,
                      int64_t{1} << 62, std::numeric_limits<int64_t>::max()}) {
    Config c =
        MakeConfig(Optimizer::Kind::kAdam, Initializer::Kind::kZeros, dim);
    EXPECT_TRUE(!c.Check().empty()) << "dim out of [1, kMaxDim] is refused";
  }
  Config c = MakeConfig(Optimizer::Kind::kFtrl, Initializer::Kind::kZeros,
                        Config::kMaxDim);
  EXPECT_TRUE(c.Check().empty()) << "dim kMaxDim is allowed";
  Table t(c);
  const int64_t id = 3;
  std::vector<float> grad(Config::kMaxDim, 1.f);
  t.Push(&id, 1, grad.data(), 0.1f, Threads);
  const Table::Contents out = t.Export();
  EXPECT_TRUE(out.keys.size() == 1 &&
              out.values.size() == static_cast<size_t>(Config::kMaxDim) &&
              out.slots.size() == static_cast<size_t>(2 * Config::kMaxDim))
      << "a table of the widest rows pushes and exports";
}

// An exception thrown on a worker thread reaches the caller (it would end
// the process on the thread that threw it).
// What a worker threw reaches the caller as what it means to a kernel: out of
// memory, or an error with its message.
TEST(SparseTable, WorkerExceptionsReachTheCaller) {
  WorkerExceptions errors;
  Threads(4, 0, [&](int64_t begin, int64_t) {
    errors.Run([&] {
      if (begin == 1) throw std::length_error("worker 1");
    });
  });
  try {
    errors.Rethrow();
    ADD_FAILURE() << "nothing rethrown";
  } catch (const std::runtime_error& e) {
    EXPECT_STREQ(e.what(), "worker 1");
  }

  WorkerExceptions oom;
  Threads(4, 0, [&](int64_t begin, int64_t) {
    oom.Run([&] {
      if (begin == 2) throw std::bad_alloc();
    });
  });
  EXPECT_THROW(oom.Rethrow(), std::bad_alloc);

  WorkerExceptions odd;
  odd.Run([] { throw 42; });
  odd.Run([] { throw std::bad_alloc(); });  // only the first is kept
  EXPECT_THROW(odd.Rethrow(), std::runtime_error);

  WorkerExceptions none;
  Threads(4, 0, [&](int64_t, int64_t) { none.Run([] {}); });
  EXPECT_NO_THROW(none.Rethrow());
}

}  // namespace
}  // namespace sparse
}  // namespace tf_lora
