// Sparse embedding table: see sparse_table.h.

#include "core/kernels/sparse_table.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <mutex>
#include <new>
#include <numeric>

#include "core/kernels/worker_exceptions.h"
#include "tensorflow/core/lib/random/philox_random.h"
#include "xla/tsl/lib/random/random_distributions_utils.h"

namespace tf_lora {
namespace sparse {
namespace {

// SplitMix64's finalizer: spreads sequential ids over shards and slots.
inline uint64_t Mix(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

constexpr int kShardBits = 6;

// Copies a row. Rows are short (a few cache lines): std::copy_n, or a plain
// loop (which GCC turns back into one), calls memmove per row; fixed-size
// chunks are inlined as vector moves.
inline void CopyRow(const float* from, int64_t n, float* to) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) std::memcpy(to + j, from + j, 8 * sizeof(float));
  for (; j < n; ++j) to[j] = from[j];
}

// Per-call scratch of the batch operations, kept per thread between calls (its
// vectors keep their capacity): fresh buffers of a few hundred KB per call
// cost page faults that, on a VM, take longer than the lookups.
struct Workspace {
  // Dedup's flat map: key and index side by side (one cache line a probe).
  struct Entry {
    int64_t key;
    int32_t slot;  // index into unique, or -1 when empty
  };
  std::vector<Entry> map;
  // The distinct ids of a batch, in first-occurrence order, and for every
  // position the index of its id among them.
  std::vector<int64_t> unique;
  std::vector<int32_t> index;
  std::vector<float> rows;  // a row (or summed gradient) per distinct id
  std::vector<int64_t> start, order, next;  // GroupByShard
};

Workspace& ThreadWorkspace() {
  static thread_local Workspace workspace;
  return workspace;
}

// Fills ws->unique and ws->index. Zipf-distributed ids repeat a lot (65,536
// Zipf(1.2) ids over 1M keys: 13.7K distinct, the hottest 18% of the batch);
// grouping the raw ids by shard would give one shard most of the work. The
// map grows with the distinct ids (load <= 1/2), so it stays in L2 when they
// are few.
void Dedup(const int64_t* ids, int64_t n, Workspace* ws) {
  uint64_t capacity = 1024;
  ws->map.assign(capacity, {0, -1});
  uint64_t mask = capacity - 1;
  ws->unique.clear();
  ws->index.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t id = ids[i];
    uint64_t h = Mix(id) & mask;
    while (ws->map[h].slot >= 0 && ws->map[h].key != id) h = (h + 1) & mask;
    if (ws->map[h].slot < 0) {
      ws->map[h] = {id, static_cast<int32_t>(ws->unique.size())};
      ws->unique.push_back(id);
      if (ws->unique.size() * 2 > capacity) {  // grow and rehash
        capacity *= 2;
        mask = capacity - 1;
        ws->map.assign(capacity, {0, -1});
        for (size_t u = 0; u < ws->unique.size(); ++u) {
          uint64_t k = Mix(ws->unique[u]) & mask;
          while (ws->map[k].slot >= 0) k = (k + 1) & mask;
          ws->map[k] = {ws->unique[u], static_cast<int32_t>(u)};
        }
      }
      ws->index[i] = static_cast<int32_t>(ws->unique.size() - 1);
      continue;
    }
    ws->index[i] = ws->map[h].slot;
  }
}

// The index of the first NaN or infinity among values[0, n), or -1. On the
// push's path: the exponent bits are tested without a branch per value, so the
// scan vectorizes, a block at a time.
int64_t FirstNonFinite(const float* values, int64_t n) {
  constexpr uint32_t kExponent = 0x7f800000u;
  constexpr int64_t kBlock = 4096;
  for (int64_t begin = 0; begin < n; begin += kBlock) {
    const int64_t end = std::min(n, begin + kBlock);
    uint32_t any = 0;
    for (int64_t i = begin; i < end; ++i) {
      uint32_t bits;
      std::memcpy(&bits, values + i, sizeof(bits));
      any |= static_cast<uint32_t>((bits & kExponent) == kExponent);
    }
    if (any != 0) {
      for (int64_t i = begin; i < end; ++i) {
        if (!std::isfinite(values[i])) return i;
      }
    }
  }
  return -1;
}

// Takes every shard's lock for reading (in shard order), and gives them back
// however the scope is left.
class ReadLockAll {
 public:
  template <typename Shards>
  explicit ReadLockAll(const Shards& shards) {
    locks_.reserve(shards.size());
    for (const auto& shard : shards) locks_.emplace_back(shard->mu);
  }

 private:
  std::vector<std::shared_lock<std::shared_mutex>> locks_;
};

}  // namespace

void Initializer::Fill(int64_t key, int64_t dim, float* row) const {
  if (kind == Kind::kZeros) {
    std::fill_n(row, dim, 0.f);
    return;
  }
  // Philox keyed by the seed, counting from a counter that holds the key in
  // its high words: every key has its own stream, whatever the arrival order.
  const uint64_t k = static_cast<uint64_t>(key);
  tsl::random::PhiloxRandom::ResultType counter;  // zeros
  counter[2] = static_cast<uint32_t>(k);
  counter[3] = static_cast<uint32_t>(k >> 32);
  tsl::random::PhiloxRandom::Key philox_key;
  philox_key[0] = static_cast<uint32_t>(seed);
  philox_key[1] = static_cast<uint32_t>(seed >> 32);
  tsl::random::PhiloxRandom gen(counter, philox_key);
  int64_t j = 0;
  while (j < dim) {
    const auto bits = gen();
    if (kind == Kind::kUniform) {
      for (int e = 0; e < 4 && j < dim; ++e, ++j) {
        row[j] = a + (b - a) * tsl::random::Uint32ToFloat(bits[e]);
      }
      continue;
    }
    for (int e = 0; e < 4 && j < dim; e += 2) {
      float z[2];
      tsl::random::BoxMullerFloat(bits[e], bits[e + 1], &z[0], &z[1]);
      for (float v : z) {
        // Truncated normal: like tf.random.truncated_normal, values more than
        // two standard deviations out are drawn again.
        if (j < dim && (kind == Kind::kNormal || std::abs(v) <= 2.f)) {
          row[j++] = a + b * v;
        }
      }
    }
  }
}

struct Table::Shard {
  static constexpr int32_t kEmpty = -1;

  // Rows live in blocks of 2^block_shift rows taken from the table's pool.
  Shard(int64_t width, int block_shift, PagePool* pool)
      : width(width),
        block_shift(block_shift),
        block_bytes((size_t{1} << block_shift) * width * sizeof(float)),
        pool(pool) {}
  ~Shard() {
    for (float* block : blocks) pool->Free(block, block_bytes);
    pool->Free(index, capacity * sizeof(Entry));
  }

  float* Row(int32_t r) {
    return const_cast<float*>(static_cast<const Shard*>(this)->Row(r));
  }
  const float* Row(int32_t r) const {
    return blocks[r >> block_shift] +
           (r & ((int32_t{1} << block_shift) - 1)) * width;
  }

  int32_t Find(int64_t key, uint64_t hash) const {
    if (capacity == 0) return kEmpty;
    const uint64_t mask = capacity - 1;
    for (uint64_t i = hash & mask;; i = (i + 1) & mask) {
      if (index[i].row == kEmpty) return kEmpty;
      if (index[i].key == key) return index[i].row;
    }
  }

  // Adds `key` (absent) with a fresh row, initialized by `init`. Everything
  // that allocates comes first: when memory runs out it throws
  // std::bad_alloc with the shard as it was (a grown index holds the same
  // keys).
  int32_t Insert(int64_t key, uint64_t hash,
                 const std::function<void(int64_t, float*)>& init) {
    if ((size + 1) * 4 > static_cast<int64_t>(capacity) * 3) Grow();
    const int32_t r = static_cast<int32_t>(size);
    const bool new_block =
        (r >> block_shift) >= static_cast<int64_t>(blocks.size());
    float* block =
        new_block ? static_cast<float*>(pool->Allocate(block_bytes)) : nullptr;
    try {
      ReserveOneMore(&counts);
      ReserveOneMore(&row_keys);
      ReserveOneMore(&last_steps);
      if (new_block) ReserveOneMore(&blocks);
    } catch (const std::bad_alloc&) {
      if (new_block) pool->Free(block, block_bytes);
      throw;
    }
    if (new_block) blocks.push_back(block);
    ++size;
    counts.push_back(0);
    row_keys.push_back(key);
    last_steps.push_back(0);
    init(key, Row(r));
    Place(key, hash, r);
    return r;
  }

  void Place(int64_t key, uint64_t hash, int32_t r) {
    const uint64_t mask = capacity - 1;
    uint64_t i = hash & mask;
    while (index[i].row != kEmpty) i = (i + 1) & mask;
    index[i].key = key;
    index[i].row = r;
  }

  // Removes `key` if present. The index closes the gap by backward shifting
  // (no tombstones); the last row moves into the freed row, so rows stay
  // dense.
  bool Remove(int64_t key, uint64_t hash) {
    if (capacity == 0) return false;
    const uint64_t mask = capacity - 1;
    uint64_t i = hash & mask;
    while (index[i].row != kEmpty && index[i].key != key) i = (i + 1) & mask;
    if (index[i].row == kEmpty) return false;
    const int32_t row = index[i].row;
    for (uint64_t j = (i + 1) & mask; index[j].row != kEmpty;
         j = (j + 1) & mask) {
      const uint64_t home = Mix(index[j].key) & mask;
      // Entry j may move back to i unless its home lies in (i, j].
      const bool home_between =
          i <= j ? (i < home && home <= j) : (i < home || home <= j);
      if (!home_between) {
        index[i].key = index[j].key;
        index[i].row = index[j].row;
        i = j;
      }
    }
    index[i].row = kEmpty;
    const int32_t last = static_cast<int32_t>(size - 1);
    if (row != last) {
      const int64_t moved = row_keys[last];
      std::copy_n(Row(last), width, Row(row));
      counts[row] = counts[last];
      last_steps[row] = last_steps[last];
      row_keys[row] = moved;
      uint64_t k = Mix(moved) & mask;
      while (index[k].key != moved || index[k].row == kEmpty)
        k = (k + 1) & mask;
      index[k].row = row;
    }
    counts.pop_back();
    last_steps.pop_back();
    row_keys.pop_back();
    --size;
    if ((size & ((int64_t{1} << block_shift) - 1)) == 0 &&
        blocks.size() > static_cast<size_t>(size >> block_shift)) {
      pool->Free(blocks.back(), block_bytes);
      blocks.pop_back();
    }
    return true;
  }

  // Room for one more element, growing geometrically.
  template <typename V>
  static void ReserveOneMore(V* v) {
    if (v->size() == v->capacity())
      v->reserve(std::max<size_t>(16, 2 * v->size()));
  }

  void Grow() { Rehash(std::max<uint64_t>(16, capacity * 2)); }

  // After removals: an index under 1/8 full shrinks to a load of at most
  // 3/8 (none at all when the shard is empty), so eviction frees the index
  // as well as the rows.
  void MaybeShrink() {
    if (size * 8 >= static_cast<int64_t>(capacity)) return;
    uint64_t fit = size == 0 ? 0 : 16;
    while (size * 8 > static_cast<int64_t>(fit) * 3) fit *= 2;
    if (fit >= capacity) return;
    try {
      Rehash(fit);
    } catch (const std::bad_alloc&) {
      // Shrinking is optional: the larger index holds the same keys.
    }
  }

  void Rehash(uint64_t new_capacity) {
    Entry* const old = index;
    const uint64_t old_capacity = capacity;
    index =
        new_capacity == 0
            ? nullptr
            : static_cast<Entry*>(pool->Allocate(new_capacity * sizeof(Entry)));
    capacity = new_capacity;
    std::fill_n(index, capacity, Entry{0, kEmpty});
    for (uint64_t i = 0; i < old_capacity; ++i) {
      if (old[i].row != kEmpty) Place(old[i].key, Mix(old[i].key), old[i].row);
    }
    pool->Free(old, old_capacity * sizeof(Entry));
  }

  // Calls fn(i, row) for the distinct ids ids[order[e]], e in [begin, end),
  // in order, with row their row or kEmpty. Lookups are pipelined: index
  // entries are prefetched kSlotAhead ids ahead, and rows found and prefetched
  // kRowAhead ahead, so that many cache misses are in flight instead of one
  // after another. fn may insert: rows never move and the ids are distinct,
  // so rows found ahead stay valid.
  template <typename Fn>
  void ForEachRow(const int64_t* ids, const int64_t* order, int64_t begin,
                  int64_t end, Fn fn) {
    constexpr int64_t kSlotAhead = 16, kRowAhead = 8;
    int32_t found[kRowAhead];
    const auto find = [&](int64_t e) {
      const int64_t key = ids[order[e]];
      return Find(key, Mix(key));
    };
    for (int64_t e = begin; e < std::min(end, begin + kSlotAhead); ++e) {
      PrefetchSlot(Mix(ids[order[e]]));
    }
    for (int64_t e = begin; e < end; ++e) {
      // This id's row, found kRowAhead ids ago (before its slot is reused).
      const int32_t ahead =
          e >= begin + kRowAhead ? found[e % kRowAhead] : kEmpty;
      if (e + kSlotAhead < end) PrefetchSlot(Mix(ids[order[e + kSlotAhead]]));
      if (e + kRowAhead < end) {
        const int32_t r = find(e + kRowAhead);
        found[(e + kRowAhead) % kRowAhead] = r;
        if (r != kEmpty) {
          __builtin_prefetch(Row(r));
          __builtin_prefetch(Row(r) + width - 1);
        }
      }
      fn(order[e], e >= begin + kRowAhead ? ahead : find(e));
    }
  }

  // Exchanges everything the shard holds with `other` (not the lock).
  void SwapContents(Shard& other) {
    std::swap(index, other.index);
    std::swap(capacity, other.capacity);
    std::swap(size, other.size);
    std::swap(blocks, other.blocks);
    std::swap(counts, other.counts);
    std::swap(last_steps, other.last_steps);
    std::swap(row_keys, other.row_keys);
  }

  // Prefetches the index entry where a lookup of `hash` starts.
  void PrefetchSlot(uint64_t hash) const {
    if (capacity != 0) __builtin_prefetch(&index[hash & (capacity - 1)]);
  }

  mutable std::shared_mutex mu;
  const int64_t width;
  const int block_shift;
  const size_t block_bytes;
  PagePool* const pool;
  // Open addressing, linear probing, load factor <= 3/4; key and row side by
  // side, so a probe touches one cache line. `capacity` entries, a power of
  // two (or none).
  struct Entry {
    int64_t key;
    int32_t row;  // kEmpty when the entry is free
  };
  Entry* index = nullptr;
  uint64_t capacity = 0;
  int64_t size = 0;
  // Rows 0 .. size-1 in blocks of 2^block_shift rows, and their metadata.
  std::vector<float*> blocks;
  std::vector<int64_t> counts, last_steps, row_keys;
};

std::string Config::CheckDim(int64_t dim) {
  if (dim < 1 || dim > kMaxDim) {
    return "dim must be in [1, " + std::to_string(kMaxDim) + "]; got " +
           std::to_string(dim);
  }
  return "";
}

Table::Table(const Config& config)
    : config_(config),
      row_width_(std::clamp<int64_t>(config.dim, 1, Config::kMaxDim) *
                 (1 + config.optimizer.Slots())) {
  // Blocks of up to 64 KiB: a power of two rows, at least one. row_width_ is
  // at most 3 * kMaxDim floats (the callers check dim, and it is clamped
  // above all the same), so the shifts cannot overflow; the bound on the
  // loop holds whatever the row.
  constexpr int64_t kBlockBytes = int64_t{64} << 10;
  const int64_t row_bytes = row_width_ * sizeof(float);
  while (block_shift_ < 16 &&
         (row_bytes << (block_shift_ + 1)) <= kBlockBytes) {
    ++block_shift_;
  }
  for (int s = 0; s < kShards; ++s) shards_.push_back(NewShard());
}

std::unique_ptr<Table::Shard> Table::NewShard() {
  return std::make_unique<Shard>(row_width_, block_shift_, &pool_);
}

Table::~Table() = default;

int64_t Table::Size() const {
  int64_t total = 0;
  for (const auto& shard : shards_) {
    std::shared_lock<std::shared_mutex> lock(shard->mu);
    total += shard->size;
  }
  return total;
}

int64_t Table::step() const { return step_.load(); }

void Table::GroupByShard(const int64_t* ids, int64_t n,
                         std::vector<int64_t>* start,
                         std::vector<int64_t>* order,
                         std::vector<int64_t>* next) {
  start->assign(kShards + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    ++(*start)[(Mix(ids[i]) >> (64 - kShardBits)) + 1];
  }
  std::partial_sum(start->begin(), start->end(), start->begin());
  next->assign(start->begin(), start->end() - 1);
  order->resize(n);
  for (int64_t i = 0; i < n; ++i) {
    (*order)[(*next)[Mix(ids[i]) >> (64 - kShardBits)]++] = i;
  }
}

void Table::InitRow(int64_t key, float* row) const {
  config_.initializer.Fill(key, config_.dim, row);
  config_.optimizer.InitSlots(config_.dim, row + config_.dim);
}

void Optimizer::InitSlots(int64_t dim, float* slots) const {
  switch (kind) {
    case Kind::kSgd:
      break;
    case Kind::kAdagrad:
      std::fill_n(slots, dim, initial_accumulator);
      break;
    case Kind::kAdam:
      std::fill_n(slots, 2 * dim, 0.f);
      break;
    case Kind::kFtrl:
      std::fill_n(slots, dim, initial_accumulator);
      std::fill_n(slots + dim, dim, 0.f);
      break;
  }
}

void Optimizer::Apply(int64_t dim, float lr, int64_t count,
                      const float* __restrict g, float* __restrict w) const {
  switch (kind) {
    case Kind::kSgd:
      for (int64_t j = 0; j < dim; ++j) w[j] -= lr * g[j];
      break;
    case Kind::kAdagrad: {  // acc += g^2; w -= lr g / sqrt(acc + eps)
      float* __restrict acc = w + dim;
      for (int64_t j = 0; j < dim; ++j) {
        acc[j] += g[j] * g[j];
        w[j] -= lr * g[j] / std::sqrt(acc[j] + epsilon);
      }
      break;
    }
    case Kind::kAdam: {
      // alpha = lr sqrt(1 - b2^t) / (1 - b1^t); m += (g - m)(1 - b1);
      // v += (g^2 - v)(1 - b2); w -= alpha m / (sqrt(v) + eps).
      // In float32, as Keras computes it.
      const float t = static_cast<float>(count);
      const float alpha = lr * std::sqrt(1.f - std::pow(beta_2, t)) /
                          (1.f - std::pow(beta_1, t));
      float* __restrict m = w + dim;
      float* __restrict v = w + 2 * dim;
      for (int64_t j = 0; j < dim; ++j) {
        m[j] += (g[j] - m[j]) * one_minus_beta_1;
        v[j] += (g[j] * g[j] - v[j]) * one_minus_beta_2;
        w[j] -= m[j] * alpha / (std::sqrt(v[j]) + epsilon);
      }
      break;
    }
    case Kind::kFtrl: {
      // new_acc = acc + g^2; linear += g - (new_acc^-p - acc^-p) / lr * w;
      // w = (clip(linear, -l1, l1) - linear) / (new_acc^-p / lr + 2 l2).
      float* __restrict acc = w + dim;
      float* __restrict linear = w + 2 * dim;
      for (int64_t j = 0; j < dim; ++j) {
        const float new_acc = acc[j] + g[j] * g[j];
        const float new_pow = std::pow(new_acc, -lr_power);
        linear[j] += g[j] - (new_pow - std::pow(acc[j], -lr_power)) / lr * w[j];
        const float quadratic = new_pow / lr + 2 * l2;
        const float clipped = std::min(std::max(linear[j], -l1), l1);
        w[j] = (clipped - linear[j]) / quadratic;
        acc[j] = new_acc;
      }
      break;
    }
  }
}

void Table::Pull(const int64_t* ids, int64_t n, bool training, float* values,
                 const ParallelFor& parallel_for) {
  // Each worker reads a contiguous run of ids with every shard locked for
  // reading: no grouping pass, no scratch rows, one copy per id straight into
  // the output. Hot (Zipf) ids stay in cache; the index entry and the row of
  // cold ids are prefetched ahead (pipelined). Ids not in the table are
  // zero rows for inference; for training they are collected and inserted in
  // a second pass under write locks (the grouped path).
  const int64_t dim = config_.dim;
  std::mutex missing_mu;
  std::vector<int64_t> missing;
  constexpr int64_t kSlotAhead = 16, kRowAhead = 8;
  WorkerExceptions errors;
  parallel_for(n, /*cycles_per_unit=*/300, [&](int64_t begin, int64_t end) {
    errors.Run([&] {
      std::vector<int64_t> missed;
      const ReadLockAll read(shards_);
      const auto shard_of = [this](uint64_t hash) -> const Shard& {
        return *shards_[hash >> (64 - kShardBits)];
      };
      const auto find = [&](int64_t i) -> const float* {
        const uint64_t hash = Mix(ids[i]);
        const Shard& shard = shard_of(hash);
        const int32_t r = shard.Find(ids[i], hash);
        return r == Shard::kEmpty ? nullptr : shard.Row(r);
      };
      const float* found[kRowAhead];
      for (int64_t i = begin; i < std::min(end, begin + kSlotAhead); ++i) {
        const uint64_t hash = Mix(ids[i]);
        shard_of(hash).PrefetchSlot(hash);
      }
      for (int64_t i = begin; i < std::min(end, begin + kRowAhead); ++i) {
        found[i % kRowAhead] = find(i);
      }
      for (int64_t i = begin; i < end; ++i) {
        const float* row = found[i % kRowAhead];
        if (i + kSlotAhead < end) {
          const uint64_t hash = Mix(ids[i + kSlotAhead]);
          shard_of(hash).PrefetchSlot(hash);
        }
        if (i + kRowAhead < end) {
          const float* ahead = find(i + kRowAhead);
          found[(i + kRowAhead) % kRowAhead] = ahead;
          if (ahead != nullptr) {
            __builtin_prefetch(ahead);
            __builtin_prefetch(ahead + dim - 1);
          }
        }
        if (row != nullptr) {
          CopyRow(row, dim, values + i * dim);
        } else if (training) {
          missed.push_back(i);
        } else {
          std::fill_n(values + i * dim, dim, 0.f);
        }
      }
      if (!missed.empty()) {
        std::lock_guard<std::mutex> lock(missing_mu);
        missing.insert(missing.end(), missed.begin(), missed.end());
      }
    });
  });
  errors.Rethrow();
  if (missing.empty()) return;
  // Training: insert the missing ids (each once) and copy their new rows.
  std::vector<int64_t> missing_ids(missing.size());
  for (size_t k = 0; k < missing.size(); ++k) missing_ids[k] = ids[missing[k]];
  Workspace& ws = ThreadWorkspace();
  Dedup(missing_ids.data(), static_cast<int64_t>(missing_ids.size()), &ws);
  const int64_t m = ws.unique.size();
  std::vector<float> rows(m * dim);
  const std::vector<int64_t> unique = ws.unique;
  const std::vector<int32_t> index = ws.index;
  PullUnique(unique.data(), m, /*training=*/true, rows.data(), parallel_for);
  for (size_t k = 0; k < missing.size(); ++k) {
    CopyRow(rows.data() + int64_t{index[k]} * dim, dim,
            values + missing[k] * dim);
  }
}

void Table::PullUnique(const int64_t* ids, int64_t n, bool training,
                       float* values, const ParallelFor& parallel_for) {
  Workspace& ws = ThreadWorkspace();
  GroupByShard(ids, n, &ws.start, &ws.order, &ws.next);
  const std::vector<int64_t>& start = ws.start;
  const std::vector<int64_t>& order = ws.order;
  const int64_t dim = config_.dim;
  const auto init = [this](int64_t key, float* row) { InitRow(key, row); };
  // A lookup or an insert misses the cache about twice: ~400 cycles an id.
  const double per_shard = 400.0 * n / kShards + 1;
  WorkerExceptions errors;
  parallel_for(kShards, per_shard, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      if (start[s] == start[s + 1]) continue;
      Shard& shard = *shards_[s];
      errors.Run([&] {
        // Inference reads share the lock; training may insert.
        std::unique_lock<std::shared_mutex> write(shard.mu, std::defer_lock);
        std::shared_lock<std::shared_mutex> read(shard.mu, std::defer_lock);
        if (training) {
          write.lock();
        } else {
          read.lock();
        }
        shard.ForEachRow(ids, order.data(), start[s], start[s + 1],
                         [&](int64_t i, int32_t r) {
                           if (r == Shard::kEmpty) {
                             if (!training) {
                               std::fill_n(values + i * dim, dim, 0.f);
                               return;
                             }
                             r = shard.Insert(ids[i], Mix(ids[i]), init);
                           }
                           CopyRow(shard.Row(r), dim, values + i * dim);
                         });
      });
    }
  });
  errors.Rethrow();
}

int64_t Table::Push(const int64_t* ids, int64_t n, const float* grads,
                    float learning_rate, const ParallelFor& parallel_for,
                    int64_t* non_finite_id) {
  const int64_t dim = config_.dim;
  // Sum the gradients of each distinct id, in the order given.
  Workspace& ws = ThreadWorkspace();
  Dedup(ids, n, &ws);
  const int64_t m = ws.unique.size();
  ws.rows.assign(m * dim, 0.f);
  float* summed = ws.rows.data();
  for (int64_t i = 0; i < n; ++i) {
    float* __restrict dst = summed + int64_t{ws.index[i]} * dim;
    const float* __restrict g = grads + i * dim;
    for (int64_t j = 0; j < dim; ++j) dst[j] += g[j];
  }
  // Checked on the sums, in cache and one row per distinct id: a NaN or an
  // infinity in any gradient of an id leaves its sum non-finite.
  const int64_t bad = FirstNonFinite(summed, m * dim);
  if (bad >= 0) {
    if (non_finite_id != nullptr) *non_finite_id = ws.unique[bad / dim];
    return 0;
  }
  const int64_t step = ++step_;
  GroupByShard(ws.unique.data(), m, &ws.start, &ws.order, &ws.next);
  const std::vector<int64_t>& start = ws.start;
  const std::vector<int64_t>& order = ws.order;
  const std::vector<int64_t>& unique = ws.unique;
  const Optimizer& opt = config_.optimizer;
  const auto init = [this](int64_t key, float* row) { InitRow(key, row); };
  const double per_shard = (400.0 + 4 * dim) * m / kShards + 1;
  WorkerExceptions errors;
  parallel_for(kShards, per_shard, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      if (start[s] == start[s + 1]) continue;
      Shard& shard = *shards_[s];
      errors.Run([&] {
        std::unique_lock<std::shared_mutex> lock(shard.mu);
        shard.ForEachRow(unique.data(), order.data(), start[s], start[s + 1],
                         [&](int64_t u, int32_t r) {
                           const int64_t key = unique[u];
                           if (r == Shard::kEmpty)
                             r = shard.Insert(key, Mix(key), init);
                           opt.Apply(dim, learning_rate, shard.counts[r] + 1,
                                     summed + u * dim, shard.Row(r));
                           ++shard.counts[r];
                           shard.last_steps[r] = step;
                         });
      });
    }
  });
  errors.Rethrow();
  return step;
}

int64_t Table::Remove(const int64_t* ids, int64_t n) {
  // Grouped by shard: one lock per shard, not one per id.
  Workspace& ws = ThreadWorkspace();
  GroupByShard(ids, n, &ws.start, &ws.order, &ws.next);
  int64_t removed = 0;
  for (int s = 0; s < kShards; ++s) {
    if (ws.start[s] == ws.start[s + 1]) continue;
    Shard& shard = *shards_[s];
    std::unique_lock<std::shared_mutex> lock(shard.mu);
    for (int64_t e = ws.start[s]; e < ws.start[s + 1]; ++e) {
      const int64_t id = ids[ws.order[e]];
      removed += shard.Remove(id, Mix(id));
    }
    shard.MaybeShrink();
  }
  return removed;
}

int64_t Table::Evict(int64_t min_update_count, int64_t max_age) {
  const int64_t now = step_.load();
  int64_t evicted = 0;
  for (auto& shard_ptr : shards_) {
    Shard& shard = *shard_ptr;
    std::unique_lock<std::shared_mutex> lock(shard.mu);
    std::vector<int64_t> doomed;
    for (int64_t r = 0; r < shard.size; ++r) {
      const bool rare = shard.counts[r] < min_update_count;
      // last_steps[r] < now - max_age, not now - last_steps[r] > max_age: an
      // imported last step may be any int64, and the difference could
      // overflow (now and max_age are both >= 0 here, so theirs cannot).
      const bool stale = max_age >= 0 && shard.last_steps[r] < now - max_age;
      if (rare || stale) doomed.push_back(shard.row_keys[r]);
    }
    for (int64_t key : doomed) evicted += shard.Remove(key, Mix(key));
    shard.MaybeShrink();
  }
  return evicted;
}

Table::Contents Table::Export() const {
  Contents out;
  const int64_t dim = config_.dim, slot_width = row_width_ - dim;
  for (const auto& shard_ptr : shards_) {
    const Shard& shard = *shard_ptr;
    std::shared_lock<std::shared_mutex> lock(shard.mu);
    for (uint64_t i = 0; i < shard.capacity; ++i) {
      const int32_t r = shard.index[i].row;
      if (r == Shard::kEmpty) continue;
      const float* row = shard.Row(r);
      out.keys.push_back(shard.index[i].key);
      out.values.insert(out.values.end(), row, row + dim);
      out.slots.insert(out.slots.end(), row + dim, row + dim + slot_width);
      out.update_counts.push_back(shard.counts[r]);
      out.last_steps.push_back(shard.last_steps[r]);
    }
  }
  return out;
}

std::string Table::CheckContents(const Contents& in, int64_t step) const {
  // What no sequence of pushes can produce, and a push would turn into NaN:
  // non-finite values or slots, negative accumulators (Adagrad's and FTRL's
  // first slot, Adam's second moment), accumulators a zero gradient would
  // divide by zero with, negative update counts or step.
  const int64_t dim = config_.dim, slot_width = row_width_ - dim;
  const Optimizer& opt = config_.optimizer;
  using Kind = Optimizer::Kind;
  const int64_t accumulator = opt.kind == Kind::kAdam ? dim : 0;
  // Counts and the step grow by one a push: far below 2^62 always; more would
  // overflow (Adam's bias correction, eviction ages) some pushes later.
  constexpr int64_t kMaxCount = int64_t{1} << 62;
  if (step < 0 || step >= kMaxCount) {
    return "step must be in [0, 2^62), got " + std::to_string(step);
  }
  for (size_t i = 0; i < in.keys.size(); ++i) {
    const std::string key = "key " + std::to_string(in.keys[i]) + ": ";
    const float* values = in.values.data() + i * dim;
    const float* slots = in.slots.data() + i * slot_width;
    if (!std::all_of(values, values + dim,
                     [](float v) { return std::isfinite(v); })) {
      return key + "its values are not all finite";
    }
    if (!std::all_of(slots, slots + slot_width,
                     [](float v) { return std::isfinite(v); })) {
      return key + "its optimizer slots are not all finite";
    }
    if (in.update_counts[i] < 0 || in.update_counts[i] >= kMaxCount) {
      return key + "update count " + std::to_string(in.update_counts[i]) +
             " is outside [0, 2^62)";
    }
    if (opt.kind == Kind::kSgd) continue;
    const float* acc = slots + accumulator;
    // The smallest accumulator the update can divide by without a NaN.
    const bool strict = (opt.kind == Kind::kAdagrad && opt.epsilon == 0) ||
                        (opt.kind == Kind::kFtrl && opt.l2 == 0);
    for (int64_t j = 0; j < dim; ++j) {
      if (acc[j] < 0 || (strict && acc[j] == 0)) {
        return key +
               (opt.kind == Kind::kAdam ? "Adam's second moment "
                                        : "the accumulator ") +
               std::to_string(acc[j]) +
               (strict ? " must be > 0" : " must be >= 0") +
               " for this table's optimizer";
      }
    }
  }
  return "";
}

std::string Table::Import(const Contents& in, int64_t step) {
  const int64_t n = in.keys.size(), dim = config_.dim;
  const int64_t slot_width = row_width_ - dim;
  {
    std::vector<int64_t> sorted = in.keys;
    std::sort(sorted.begin(), sorted.end());
    const auto dup = std::adjacent_find(sorted.begin(), sorted.end());
    if (dup != sorted.end()) {
      return "duplicate key " + std::to_string(*dup);
    }
  }
  const std::string bad = CheckContents(in, step);
  if (!bad.empty()) return bad;
  // Build the new shards aside, then swap them in: a failure above leaves the
  // table as it was.
  std::vector<std::unique_ptr<Shard>> fresh;
  for (int s = 0; s < kShards; ++s) fresh.push_back(NewShard());
  for (int64_t i = 0; i < n; ++i) {
    const int64_t key = in.keys[i];
    const uint64_t hash = Mix(key);
    Shard& shard = *fresh[hash >> (64 - kShardBits)];
    const int32_t r = shard.Insert(key, hash, [&](int64_t, float* row) {
      std::copy_n(in.values.data() + i * dim, dim, row);
      std::copy_n(in.slots.data() + i * slot_width, slot_width, row + dim);
    });
    shard.counts[r] = in.update_counts[i];
    shard.last_steps[r] = in.last_steps[i];
  }
  // Every shard write-locked (in shard order, as everything that takes more
  // than one lock does) while the contents change: a concurrent pull sees the
  // old table or the new one, never a mix.
  for (auto& shard : shards_) shard->mu.lock();
  for (int s = 0; s < kShards; ++s) shards_[s]->SwapContents(*fresh[s]);
  step_ = step;
  for (auto& shard : shards_) shard->mu.unlock();
  return "";
}

}  // namespace sparse
}  // namespace tf_lora
