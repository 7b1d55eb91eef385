// Running out of memory inside an op kernel, as an error rather than an abort.

#ifndef TF_LORA_CORE_KERNELS_OUT_OF_MEMORY_H_
#define TF_LORA_CORE_KERNELS_OUT_OF_MEMORY_H_

#include <new>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace tf_lora {

// Runs fn (the kernel's work), turning a std::bad_alloc into the
// ResourceExhausted error "<op>: out of memory <what>": it must not unwind
// through TensorFlow's frames, where it would abort the process. `what` says
// what ran short and the state the op leaves behind.
template <typename Fn>
absl::Status OutOfMemoryToStatus(const char* op, const char* what, Fn fn) {
  try {
    fn();
    return absl::OkStatus();
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(
        absl::StrCat(op, ": out of memory ", what));
  }
}

}  // namespace tf_lora

#endif  // TF_LORA_CORE_KERNELS_OUT_OF_MEMORY_H_
