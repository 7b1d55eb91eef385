// Memory for a sparse table's large arrays (row blocks, hash indexes), taken
// from 2 MiB-aligned chunks that the kernel may back with transparent huge
// pages.
//
// Why: a lookup in a table of a million keys touches a random index entry and
// a random row. With 4 KiB pages every cold id then costs two TLB misses (a
// page walk each) besides the cache misses; TensorFlow's dense gather pays
// one. With the index and the rows on 2 MiB pages a 160 MB table is 80 TLB
// entries, which the second-level TLB holds (the pull's gain is in
// benchmarks/RESULTS.md).
//
// Small blocks share a chunk (a slab per block size), so tables are not
// rounded up to 2 MiB per shard. Huge pages are asked for (MADV_HUGEPAGE) only
// once a pool holds kHugeAfter chunks, so a small table stays small: a huge
// page is resident as a whole once touched. At that point the chunks touched
// so far are collapsed (MADV_COLLAPSE). Allocations of more than half a chunk
// get their own mapping, also 2 MiB-aligned.

#ifndef TF_LORA_CORE_KERNELS_PAGE_POOL_H_
#define TF_LORA_CORE_KERNELS_PAGE_POOL_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <vector>

namespace tf_lora {
namespace sparse {

class PagePool {
 public:
  static constexpr size_t kChunk = size_t{2} << 20;
  // Smaller allocations come from the C++ heap (64-byte aligned).
  static constexpr size_t kMinPooled = size_t{16} << 10;
  static constexpr int kHugeAfter = 8;

  PagePool() = default;
  ~PagePool();
  PagePool(const PagePool&) = delete;
  PagePool& operator=(const PagePool&) = delete;

  // 64-byte aligned, uninitialized. Throws std::bad_alloc when out of memory.
  void* Allocate(size_t bytes);
  // `bytes` as given to Allocate.
  void Free(void* p, size_t bytes);

  // For tests and reports: chunks mapped for slabs (in use or spare), bytes
  // mapped for allocations of their own, and whether huge pages were asked.
  int slab_chunks() const;
  size_t large_bytes() const;
  bool huge() const;

 private:
  struct Chunk {
    size_t slot_bytes;
    std::vector<uint32_t> free_slots;
    uint32_t used = 0;
  };
  void* MapAligned(size_t bytes);  // locked
  void Advise(void* p, size_t bytes, bool collapse);
  void MaybeGoHuge();  // locked

  mutable std::mutex mu_;
  std::map<uintptr_t, Chunk> chunks_;              // by base address
  std::map<size_t, std::vector<uintptr_t>> open_;  // slot size -> chunks
  std::map<uintptr_t, size_t> large_;              // base -> mapped bytes
  size_t large_bytes_ = 0;
  bool huge_ = false;
};

}  // namespace sparse
}  // namespace tf_lora

#endif  // TF_LORA_CORE_KERNELS_PAGE_POOL_H_
