// Transparent huge pages: the switch and the advice, shared by the sparse
// table's page pool and the LoRA kernels' large outputs.

#ifndef TF_LORA_CORE_KERNELS_HUGE_PAGES_H_
#define TF_LORA_CORE_KERNELS_HUGE_PAGES_H_

#include <sys/mman.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace tf_lora {

// TF_LORA_HUGE_PAGES=0 turns all huge-page advice off (to measure without
// it, or where a system's khugepaged misbehaves).
inline bool HugePagesAllowed() {
  static const bool allowed = [] {
    const char* v = std::getenv("TF_LORA_HUGE_PAGES");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return allowed;
}

// Asks for huge pages on the 2 MiB-aligned part of [p, p + bytes). Advice
// only: where the kernel has no THP, or THP is "never", nothing changes.
inline void AdviseHugePages(const void* p, size_t bytes) {
  if (!HugePagesAllowed()) return;
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t begin =
      (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHuge - 1);
  if (end > begin) {
    madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
}

}  // namespace tf_lora

#endif  // TF_LORA_CORE_KERNELS_HUGE_PAGES_H_
