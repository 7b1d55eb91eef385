// Timing helpers shared by the C++ benchmark harnesses.

#ifndef TF_LORA_BENCHMARKS_HARNESS_TIMING_H_
#define TF_LORA_BENCHMARKS_HARNESS_TIMING_H_

#include <algorithm>
#include <chrono>
#include <vector>

namespace tf_lora_bench {

// Seconds on a monotonic clock.
inline double Now() {
  return std::chrono::duration<double>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// The median of `seconds`, in milliseconds.
inline double MedianMs(std::vector<double> seconds) {
  std::sort(seconds.begin(), seconds.end());
  return seconds[seconds.size() / 2] * 1e3;
}

}  // namespace tf_lora_bench

#endif  // TF_LORA_BENCHMARKS_HARNESS_TIMING_H_
