// Sparse embedding table: int64 keys -> float32 rows of `dim`, with optimizer
// slots and per-key metadata. Pure C++ (no TensorFlow types): the OpKernel
// glue (sparse_table_kernels.cc) wraps it in a resource; sparse_table_test.cc
// tests it alone.
//
// Storage is sharded and lock-striped: each shard owns an open-addressing hash
// index (key -> row) and its rows, kept contiguously in fixed-size blocks (not
// one heap allocation per key). Blocks and indexes come from the table's
// PagePool (huge pages for large tables, see page_pool.h). A row holds the
// values and the optimizer slots side by side; metadata (update count, last
// step) lives in parallel arrays. Batch operations group their ids by shard and
// take each shard's lock once.

#ifndef TF_LORA_CORE_KERNELS_SPARSE_TABLE_H_
#define TF_LORA_CORE_KERNELS_SPARSE_TABLE_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <vector>

#include "core/kernels/page_pool.h"

namespace tf_lora {
namespace sparse {

// How a new key's row is initialized: a pure function of (seed, key), so the
// order in which keys arrive and the shard they land in never change it.
struct Initializer {
  enum class Kind { kZeros, kUniform, kNormal, kTruncatedNormal };
  Kind kind = Kind::kZeros;
  float a = 0, b = 0;  // uniform: [a, b); (truncated) normal: mean a, stddev b
  uint64_t seed = 0;

  void Fill(int64_t key, int64_t dim, float* row) const;
};

// The update a push applies to a key's row, as Keras 3's optimizers of the
// same names compute it for a dense variable. Slots per value: Adagrad the
// accumulator; Adam m and v; FTRL the accumulator and the linear term. Adam's
// bias correction counts the key's own updates (lazily updated moments: for
// keys pushed every step this is Keras's step).
struct Optimizer {
  enum class Kind { kSgd, kAdagrad, kAdam, kFtrl };
  Kind kind = Kind::kSgd;
  float initial_accumulator = 0.1f;      // Adagrad, FTRL
  float epsilon = 1e-7f;                 // Adagrad, Adam
  float beta_1 = 0.9f, beta_2 = 0.999f;  // Adam
  // 1 - beta_1 and 1 - beta_2, rounded from double precision as Keras does
  // (1 - 0.9f in float32 differs by 2e-7, 2e-6 in the weights after a few
  // steps).
  float one_minus_beta_1 = 0.1f, one_minus_beta_2 = 0.001f;
  float l1 = 0, l2 = 0, lr_power = -0.5f;  // FTRL

  int Slots() const {
    switch (kind) {
      case Kind::kSgd:
        return 0;
      case Kind::kAdagrad:
        return 1;
      default:
        return 2;
    }
  }
  // Sets a new key's slots (dim values each, after the row's values).
  void InitSlots(int64_t dim, float* slots) const;
  // Applies gradient g to row (values then slots); `count` is the key's
  // update count including this one.
  void Apply(int64_t dim, float learning_rate, int64_t count, const float* g,
             float* row) const;
};

struct Config {
  // The widest row a table takes: 2^20 floats (4 MiB of values; with Adam's
  // or FTRL's two slots 12 MiB a row). Embedding rows are a few hundred
  // values wide; the bound keeps every size computed from dim far from
  // overflowing int64.
  static constexpr int64_t kMaxDim = int64_t{1} << 20;

  int64_t dim = 0;
  Initializer initializer;
  Optimizer optimizer;

  // "" when `dim` is in [1, kMaxDim], else what is wrong: the one check of a
  // row width, for the op's shape functions and kernels too.
  static std::string CheckDim(int64_t dim);
  // "" when the table can be built, else what is wrong (dim out of range).
  std::string Check() const { return CheckDim(dim); }
};

// Parallel-for over [0, n): calls fn(begin, end) for disjoint ranges; each
// unit costs about `cycles_per_unit` (for splitting the work).
using ParallelFor =
    std::function<void(int64_t n, double cycles_per_unit,
                       std::function<void(int64_t, int64_t)> fn)>;

class Table {
 public:
  static constexpr int kShards = 64;

  // config.Check() must have passed.
  explicit Table(const Config& config);
  ~Table();
  Table(const Table&) = delete;
  Table& operator=(const Table&) = delete;

  const Config& config() const { return config_; }
  int64_t dim() const { return config_.dim; }
  int64_t row_width() const { return row_width_; }  // dim * (1 + slots)
  int64_t Size() const;
  const PagePool& pool() const { return pool_; }
  int64_t step() const;

  // values[i, :] = row of ids[i]. training: missing ids are inserted with
  // their initial row; otherwise missing ids read as zeros and nothing is
  // inserted (each missing id once).
  void Pull(const int64_t* ids, int64_t n, bool training, float* values,
            const ParallelFor& parallel_for);

  // Sums the gradients of duplicate ids, then applies the optimizer once per
  // unique id (inserting ids not present), counts the update and stamps the
  // table's step, which each push advances by one.
  // Returns the step this push stamped. A summed gradient holding a NaN or an
  // infinity (any gradient of the id that does) would poison the row and its
  // slots: then nothing changes, not even the step, the result is 0, and
  // *non_finite_id (when given) is that id.
  int64_t Push(const int64_t* ids, int64_t n, const float* grads,
               float learning_rate, const ParallelFor& parallel_for,
               int64_t* non_finite_id = nullptr);

  // Removes the given keys (absent ones are ignored); returns how many went.
  int64_t Remove(const int64_t* ids, int64_t n);

  // Removes every key updated fewer than min_update_count times, or (when
  // max_age >= 0) last updated more than max_age steps ago; returns how many.
  int64_t Evict(int64_t min_update_count, int64_t max_age);

  // Every key with its values, slots (row_width - dim per key) and metadata
  // (update count, last step), in an unspecified but consistent order.
  struct Contents {
    std::vector<int64_t> keys;
    std::vector<float> values, slots;
    std::vector<int64_t> update_counts, last_steps;
  };
  Contents Export() const;

  // Replaces the whole contents (and sets the step to `step`). The caller has
  // checked the shapes; duplicate keys and contents CheckContents refuses are
  // errors, reported before anything changes.
  std::string Import(const Contents& contents, int64_t step);
  // "" when `contents` (shapes already checked) is something this table's
  // optimizer can go on from, else what is wrong.
  std::string CheckContents(const Contents& contents, int64_t step) const;

 private:
  struct Shard;
  // A new key's row: initializer values, optimizer slots at their start.
  void InitRow(int64_t key, float* row) const;
  // Pull of distinct ids.
  void PullUnique(const int64_t* ids, int64_t n, bool training, float* values,
                  const ParallelFor& parallel_for);
  // Groups ids by shard: the ids of shard s are order[start[s] .. start[s+1]).
  static void GroupByShard(const int64_t* ids, int64_t n,
                           std::vector<int64_t>* start,
                           std::vector<int64_t>* order,
                           std::vector<int64_t>* next);

  std::unique_ptr<Shard> NewShard();

  Config config_;
  int64_t row_width_;
  int block_shift_ = 0;  // rows a block: 2^block_shift_
  PagePool pool_;        // before shards_: destroyed after them
  std::vector<std::unique_ptr<Shard>> shards_;
  std::atomic<int64_t> step_{0};
};

}  // namespace sparse
}  // namespace tf_lora

#endif  // TF_LORA_CORE_KERNELS_SPARSE_TABLE_H_
