// Exceptions inside an op kernel, as error statuses rather than an abort.

#ifndef TF_LORA_CORE_KERNELS_EXCEPTIONS_TO_STATUS_H_
#define TF_LORA_CORE_KERNELS_EXCEPTIONS_TO_STATUS_H_

#include <exception>
#include <new>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace tf_lora {

// Runs fn (the kernel's work) and turns any exception it throws into an error:
// unwinding through TensorFlow's frames would abort the process.
//   std::bad_alloc: ResourceExhausted "<op>: out of memory <what>"; `what`
//     says what ran short and the state the op leaves behind.
//   anything else: Internal "<op>: <the exception's message>". The kernels
//     check their sizes before running, so this is a bug to report, never an
//     answer to bad input; it still must not take the process down.
// Work done on worker threads reaches here through WorkerExceptions.
template <typename Fn>
absl::Status ExceptionsToStatus(const char* op, const char* what, Fn fn) {
  try {
    fn();
    return absl::OkStatus();
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(
        absl::StrCat(op, ": out of memory ", what));
  } catch (const std::exception& e) {
    return absl::InternalError(
        absl::StrCat(op, ": unexpected error (please report): ", e.what()));
  } catch (...) {
    return absl::InternalError(
        absl::StrCat(op, ": unexpected error of unknown type (please report)"));
  }
}

}  // namespace tf_lora

#endif  // TF_LORA_CORE_KERNELS_EXCEPTIONS_TO_STATUS_H_
