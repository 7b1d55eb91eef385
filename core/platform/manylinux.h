// Included first in every translation unit of the op libraries (the -include
// of tools/build_defs.bzl): references that a newer glibc or libstdc++ would
// version past the manylinux_2_27 policy, the oldest platform TensorFlow's
// own wheels support, bind to the versions older systems have. Both old and
// new versions exist on new systems, with the same behaviour
// (docs/building.md, "A manylinux wheel"). auditwheel checks the result when
// `make wheel` repairs the wheel to the manylinux_2_27 tag.

#ifndef TF_LORA_CORE_PLATFORM_MANYLINUX_H_
#define TF_LORA_CORE_PLATFORM_MANYLINUX_H_

#if defined(__x86_64__) && defined(__linux__) && !defined(__CUDACC__)
// std::shared_mutex: glibc 2.34 moved libpthread into libc and gave these new
// versions; GLIBC_2.2.5 is the version every x86-64 glibc has.
__asm__(".symver pthread_rwlock_rdlock,pthread_rwlock_rdlock@GLIBC_2.2.5");
__asm__(".symver pthread_rwlock_wrlock,pthread_rwlock_wrlock@GLIBC_2.2.5");
__asm__(".symver pthread_rwlock_unlock,pthread_rwlock_unlock@GLIBC_2.2.5");
__asm__(
    ".symver pthread_rwlock_tryrdlock,pthread_rwlock_tryrdlock@GLIBC_2.2.5");
__asm__(
    ".symver pthread_rwlock_trywrlock,pthread_rwlock_trywrlock@GLIBC_2.2.5");
// std::condition_variable::wait: GCC 12 added GLIBCXX_3.4.30 beside the
// GLIBCXX_3.4.11 one, which stays the same function.
__asm__(
    ".symver _ZNSt18condition_variable4waitERSt11unique_lockISt5mutexE,"
    "_ZNSt18condition_variable4waitERSt11unique_lockISt5mutexE@GLIBCXX_3.4.11");
#endif

#endif  // TF_LORA_CORE_PLATFORM_MANYLINUX_H_
