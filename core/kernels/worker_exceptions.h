// Exceptions thrown on worker threads, carried to the calling thread.

#ifndef TF_LORA_CORE_KERNELS_WORKER_EXCEPTIONS_H_
#define TF_LORA_CORE_KERNELS_WORKER_EXCEPTIONS_H_

#include <exception>
#include <mutex>

namespace tf_lora {

// An exception that leaves a function run by a thread pool terminates the
// process. Each worker runs its share through Run, which keeps the first
// exception thrown (of any type); after the parallel loop the calling thread
// calls Rethrow, which throws it there, where the kernel turns it into an
// error status (ExceptionsToStatus).
class WorkerExceptions {
 public:
  template <typename Fn>
  void Run(Fn&& fn) noexcept {
    try {
      fn();
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu_);
      if (!first_) first_ = std::current_exception();
    }
  }

  // Throws the first exception a worker caught, if any. Call after every
  // worker has returned.
  void Rethrow() const {
    if (first_) std::rethrow_exception(first_);
  }

 private:
  std::mutex mu_;
  std::exception_ptr first_;
};

}  // namespace tf_lora

#endif  // TF_LORA_CORE_KERNELS_WORKER_EXCEPTIONS_H_
