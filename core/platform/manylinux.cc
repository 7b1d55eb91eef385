// Definitions, local to each op library, of what newer glibc and libstdc++
// headers make code call but older systems lack (see manylinux.h).

#include "core/platform/manylinux.h"

#include <new>

#if defined(__x86_64__) && defined(__linux__)
// GCC 11+ headers read this (glibc 2.32+) to skip atomic reference counts in
// single-threaded processes. Zero means "maybe several threads": the atomic
// path, always right.
extern "C" __attribute__((visibility("hidden"))) char __libc_single_threaded =
    0;

// GCC 11+ headers call this (GLIBCXX_3.4.29) when new[] gets a length that
// overflows.
namespace std {
__attribute__((visibility("hidden"), noreturn)) void
__throw_bad_array_new_length() {
  throw bad_array_new_length();
}
}  // namespace std
#endif
