// Memory for a sparse table's large arrays: see page_pool.h.

#include "core/kernels/page_pool.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>

#include "core/kernels/huge_pages.h"

namespace tf_lora {
namespace sparse {
namespace {

constexpr size_t kAlign = 64;

// MADV_COLLAPSE (Linux 6.1) turns the small pages of a range into huge pages
// now; glibc 2.36's headers predate it.
#ifdef MADV_COLLAPSE
constexpr int kCollapse = MADV_COLLAPSE;
#else
constexpr int kCollapse = 25;
#endif

size_t RoundUp(size_t n, size_t to) { return (n + to - 1) / to * to; }

}  // namespace

PagePool::~PagePool() {
  for (const auto& [base, chunk] : chunks_) {
    munmap(reinterpret_cast<void*>(base), kChunk);
  }
  for (const auto& [base, bytes] : large_) {
    munmap(reinterpret_cast<void*>(base), bytes);
  }
}

void* PagePool::MapAligned(size_t bytes) {
  // Map a chunk more than needed, then unmap the misaligned head and tail.
  const size_t span = bytes + kChunk;
  void* raw = mmap(nullptr, span, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) throw std::bad_alloc();
  const uintptr_t start = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = RoundUp(start, kChunk);
  if (aligned > start) munmap(raw, aligned - start);
  const uintptr_t end = start + span, used_end = aligned + bytes;
  if (end > used_end) munmap(reinterpret_cast<void*>(used_end), end - used_end);
  void* p = reinterpret_cast<void*>(aligned);
  if (huge_) Advise(p, bytes, /*collapse=*/false);  // nothing touched yet
  return p;
}

void PagePool::Advise(void* p, size_t bytes, bool collapse) {
  // Advice only: where the kernel refuses (no THP, an older kernel without
  // MADV_COLLAPSE), the memory stays on small pages and works the same.
  madvise(p, bytes, MADV_HUGEPAGE);
  if (collapse) madvise(p, bytes, kCollapse);
}

void PagePool::MaybeGoHuge() {
  if (huge_ || !HugePagesAllowed()) return;
  if (chunks_.size() + large_bytes_ / kChunk < size_t{kHugeAfter}) return;
  huge_ = true;
  // The pages touched so far are collapsed into huge pages at once: they hold
  // the table's first rows, its oldest and often hottest keys.
  for (const auto& [base, chunk] : chunks_) {
    Advise(reinterpret_cast<void*>(base), kChunk, /*collapse=*/true);
  }
  for (const auto& [base, bytes] : large_) {
    Advise(reinterpret_cast<void*>(base), bytes, /*collapse=*/true);
  }
}

void* PagePool::Allocate(size_t bytes) {
  if (bytes < kMinPooled) {
    return ::operator new(RoundUp(bytes, kAlign), std::align_val_t(kAlign));
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (bytes > kChunk / 2) {  // fewer than two a chunk: a mapping of its own
    const size_t mapped = RoundUp(bytes, kChunk);
    large_bytes_ += mapped;
    MaybeGoHuge();  // first, so that the new mapping is advised untouched
    void* p;
    try {
      p = MapAligned(mapped);
    } catch (const std::bad_alloc&) {
      large_bytes_ -= mapped;
      throw;
    }
    large_[reinterpret_cast<uintptr_t>(p)] = mapped;
    return p;
  }
  // One cache line of padding a slot: slots of a power-of-two size would all
  // start on the same cache sets, and the rows at the start of every shard's
  // first block (its oldest keys, often its hottest) would evict each other.
  const size_t slot = RoundUp(bytes, kAlign) + kAlign;
  std::vector<uintptr_t>& open = open_[slot];
  if (open.empty()) {
    void* p = MapAligned(kChunk);
    const uintptr_t base = reinterpret_cast<uintptr_t>(p);
    Chunk chunk{slot, {}, 0};
    const uint32_t slots = static_cast<uint32_t>(kChunk / slot);
    // Handed out from the chunk's start on: pages are touched in order.
    for (uint32_t s = slots; s-- > 0;) chunk.free_slots.push_back(s);
    chunks_.emplace(base, std::move(chunk));
    open.push_back(base);
    MaybeGoHuge();
  }
  const uintptr_t base = open.back();
  Chunk& chunk = chunks_.at(base);
  const uint32_t s = chunk.free_slots.back();
  chunk.free_slots.pop_back();
  ++chunk.used;
  if (chunk.free_slots.empty()) open.pop_back();
  return reinterpret_cast<void*>(base + size_t{s} * slot);
}

void PagePool::Free(void* p, size_t bytes) {
  if (p == nullptr) return;
  if (bytes < kMinPooled) {
    ::operator delete(p, std::align_val_t(kAlign));
    return;
  }
  std::lock_guard<std::mutex> lock(mu_);
  const uintptr_t address = reinterpret_cast<uintptr_t>(p);
  if (bytes > kChunk / 2) {
    const auto it = large_.find(address);
    munmap(p, it->second);
    large_bytes_ -= it->second;
    large_.erase(it);
    return;
  }
  const uintptr_t base = address & ~(uintptr_t{kChunk} - 1);
  Chunk& chunk = chunks_.at(base);
  std::vector<uintptr_t>& open = open_[chunk.slot_bytes];
  if (chunk.free_slots.empty()) open.push_back(base);
  chunk.free_slots.push_back(
      static_cast<uint32_t>((address - base) / chunk.slot_bytes));
  --chunk.used;
  // An empty chunk goes back to the system unless it is the only one of its
  // size with room (kept as the spare, so a size hovering at a block
  // boundary does not map and unmap a chunk each time).
  if (chunk.used == 0 && open.size() > 1) {
    open.erase(std::find(open.begin(), open.end(), base));
    munmap(reinterpret_cast<void*>(base), kChunk);
    chunks_.erase(base);
  }
}

int PagePool::slab_chunks() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int>(chunks_.size());
}

size_t PagePool::large_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return large_bytes_;
}

bool PagePool::huge() const {
  std::lock_guard<std::mutex> lock(mu_);
  return huge_;
}

}  // namespace sparse
}  // namespace tf_lora
