// Exceptions thrown on worker threads, carried to the calling thread.

#ifndef TF_LORA_CORE_KERNELS_WORKER_EXCEPTIONS_H_
#define TF_LORA_CORE_KERNELS_WORKER_EXCEPTIONS_H_

#include <exception>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>

namespace tf_lora {

// An exception that leaves a function run by a thread pool terminates the
// process. Each worker runs its share through Run, which keeps what the
// first exception thrown (of any type) means to a kernel: out of memory, or
// another error with its message. After the parallel loop the calling thread
// calls Rethrow, which throws it there (std::bad_alloc, or std::runtime_error
// with the message), where the kernel turns it into an error status
// (ExceptionsToStatus).
//
// What is kept is that meaning, not the exception object: std::exception_ptr's
// inline code needs a libstdc++ newer than the oldest the wheel supports
// (docs/building.md, "A manylinux wheel").
class WorkerExceptions {
 public:
  template <typename Fn>
  void Run(Fn&& fn) noexcept {
    try {
      fn();
    } catch (const std::bad_alloc&) {
      Keep(Kind::kOutOfMemory, "");
    } catch (const std::exception& e) {
      Keep(Kind::kError, e.what());
    } catch (...) {
      Keep(Kind::kError, "an exception of unknown type");
    }
  }

  // Throws what the first worker that failed threw, if any. Call after every
  // worker has returned.
  void Rethrow() const {
    if (kind_ == Kind::kOutOfMemory) throw std::bad_alloc();
    if (kind_ == Kind::kError) throw std::runtime_error(message_);
  }

 private:
  enum class Kind { kNone, kOutOfMemory, kError };

  void Keep(Kind kind, const char* message) noexcept {
    std::lock_guard<std::mutex> lock(mu_);
    if (kind_ != Kind::kNone) return;
    kind_ = kind;
    try {
      message_ = message;
    } catch (const std::bad_alloc&) {
      kind_ = Kind::kOutOfMemory;  // no memory left for the message either
    }
  }

  std::mutex mu_;
  Kind kind_ = Kind::kNone;
  std::string message_;
};

}  // namespace tf_lora

#endif  // TF_LORA_CORE_KERNELS_WORKER_EXCEPTIONS_H_
