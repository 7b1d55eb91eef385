"""Build rules for tf_lora's C++. The one place that owns compile and link options.

Targets are layered as in tensorflow/text: a library per concern, the op libraries assembled from them.

    tf_lora_cc_library(name, srcs, hdrs, deps, alwayslink)
        A cc_library compiled with TensorFlow's flags and headers: functors, tables, kernel glue
        (alwayslink = 1 for libraries whose only job is to register kernels or ops).
    tf_lora_gpu_library(name, srcs, hdrs, deps)
        CUDA sources (*.cu.cc) compiled with nvcc, linked in only under --config=cuda (an empty library
        otherwise); --config=cuda also defines GOOGLE_CUDA=1 for every tf_lora_cc_library.
    tf_lora_op_library(name = "_lora_ops.so", deps = [...])
        One op family: a shared library loadable by tf.load_op_library, linked from its libraries.
    tf_lora_gen_op_wrapper(name = "gen_lora_ops", library = ":_lora_ops.so")
        Runs tools/gen_op_wrapper.py on the built library: TensorFlow's own Python op wrapper generator
        writes gen_lora_ops.py, which loads the library through tf_lora.python.ops._loader.
    tf_lora_cc_binary(name, srcs, deps, copts)
        A C++ program (benchmarks/harness) with the same options.
    tf_lora_cc_test(name, srcs, deps)
        A googletest test (@com_google_googletest, gtest_main) compiled with the same options, linked
        against TensorFlow's framework library.
"""

load("@local_config_tf//:build_defs.bzl", "TF_COPTS", "TF_LINKOPTS")

# TF_COPTS comes from tf.sysconfig.get_compile_flags() (ABI flag, C++ standard, Eigen alignment).
_COPTS = TF_COPTS + [
    "-fPIC",
    "-pthread",
    "-Wno-sign-compare",
    "-Wno-ignored-attributes",
    "-Wno-psabi",
    # --std=c++17 (ISO, not gnu++17) turns floating-point contraction off; the kernels want a*b+c fused.
    "-ffp-contract=fast",
]

_CUDA_COPTS = ["-DGOOGLE_CUDA=1"]

_TF_HEADERS = ["@local_config_tf//:tf_header_lib"]

# nvcc (CUDA 11.8: tools/cuda_toolchain.py, docs/building.md "CUDA"). Device code for the architectures
# TensorFlow 2.21's own kernels target (sm_60, sm_70, sm_80, sm_89, sm_90) and PTX for sm_90, which newer
# GPUs compile when they load it. The CUDA sources include no TensorFlow header. GCC 12 is newer than
# nvcc 11.8 lists; the sources are plain C++17 it compiles.
_CUDA_ARCHS = ["60", "70", "80", "89", "90"]
_NVCC_FLAGS = [
    "-std=c++17",
    "-O3",
    "-DNDEBUG",
    "-DGOOGLE_CUDA=1",
    "-I.",
    "-Xcompiler -fPIC",
    "-allow-unsupported-compiler",
] + ["-gencode arch=compute_%s,code=sm_%s" % (a, a) for a in _CUDA_ARCHS] + [
    "-gencode arch=compute_90,code=compute_90",
]

# Every translation unit of the op libraries starts with core/platform/manylinux.h, and every op library
# links core/platform/manylinux.cc: the libraries then need no glibc or libstdc++ newer than the
# manylinux_2_27 policy allows (docs/building.md, "A manylinux wheel").
_MANYLINUX_COPTS = ["-include", "core/platform/manylinux.h"]
_MANYLINUX = ["//core/platform:manylinux"]

def tf_lora_copts():
    return _COPTS + select({
        "//tools:using_cuda": _CUDA_COPTS,
        "//conditions:default": [],
    })

def tf_lora_cc_library(name, srcs = [], hdrs = [], deps = [], **kwargs):
    """A cc_library of tf_lora's C++, compiled with TensorFlow's flags against its headers."""
    native.cc_library(
        name = name,
        srcs = srcs,
        hdrs = hdrs,
        copts = tf_lora_copts() + _MANYLINUX_COPTS,
        deps = deps + _TF_HEADERS + _MANYLINUX,
        **kwargs
    )

def tf_lora_gpu_library(name, srcs, hdrs = [], deps = []):
    """Compiles CUDA sources with nvcc into an always-linked static library, under --config=cuda only
    (docs/building.md, CUDA). `hdrs` are the headers the sources include; `deps` are the cc_libraries
    those headers belong to (for the host side).

    No cudart is linked: libtensorflow_framework.so.2 exports the CUDA runtime entry points and forwards
    them to TensorFlow's own CUDA 12 runtime. `.lo` tells Bazel to link the archive whole (alwayslink).
    The nvcc step is tagged manual: `bazel build //...` without --config=cuda never runs it.
    """
    objs = [src.replace("/", "_").replace(":", "_") + ".o" for src in srcs]
    native.genrule(
        name = name + "_nvcc",
        srcs = srcs + hdrs,
        outs = [name + ".lo"],
        cmd = " && ".join([
            "NVCC=$${NVCC:-nvcc}",
            "OBJ=$$(mktemp -d)",
        ] + [
            ("$$NVCC -x cu -c $(location %s) -o $$OBJ/%s %s") % (src, obj, " ".join(_NVCC_FLAGS))
            for src, obj in zip(srcs, objs)
        ] + [
            "ar rcs $@ " + " ".join(["$$OBJ/" + obj for obj in objs]),
            "rm -rf $$OBJ",
        ]),
        tags = ["manual"],
        message = "Compiling CUDA sources of " + name,
    )
    native.cc_library(
        name = name,
        srcs = select({
            "//tools:using_cuda": [name + ".lo"],
            "//conditions:default": [],
        }),
        alwayslink = 1,
        deps = deps,
    )

def tf_lora_op_library(name, deps, **kwargs):
    """A shared library of one op family, loadable with tf.load_op_library, linked from `deps` (the op
    definitions and kernels, alwayslink libraries)."""
    native.cc_binary(
        name = name,
        copts = tf_lora_copts(),
        linkshared = 1,
        # TF's own link flags: the library needs libtensorflow_framework.so.2 by soname only (TensorFlow
        # has loaded it before any op library), with no RUNPATH into Bazel's output tree.
        linkopts = TF_LINKOPTS + ["-Wl,--no-undefined", "-pthread"],
        deps = deps + _TF_HEADERS + _MANYLINUX,
        **kwargs
    )

def tf_lora_cc_binary(name, srcs, deps = [], copts = [], **kwargs):
    """A C++ program (the benchmark harnesses) built with the op libraries' options."""
    native.cc_binary(
        name = name,
        srcs = srcs,
        copts = tf_lora_copts() + copts,
        linkopts = ["-pthread"],
        deps = deps + _TF_HEADERS,
        **kwargs
    )

def tf_lora_cc_test(name, srcs, deps = [], size = "small", **kwargs):
    """A googletest test built with the op libraries' options."""
    native.cc_test(
        name = name,
        size = size,
        srcs = srcs,
        copts = tf_lora_copts(),
        linkopts = ["-pthread"],
        deps = deps + _TF_HEADERS + [
            "@com_google_googletest//:gtest_main",
            "@local_config_tf//:libtensorflow_framework",
        ],
        **kwargs
    )

def tf_lora_gen_op_wrapper(name, library):
    """Generates `<name>.py` from `library` with TensorFlow's Python op wrapper generator."""
    native.genrule(
        name = name + "_py",
        srcs = [library, "@local_config_tf//:tf_version.txt"],
        outs = [name + ".py"],
        tools = ["@local_config_tf//:python", "//tools:gen_op_wrapper.py"],
        cmd = ("$(location @local_config_tf//:python) $(location //tools:gen_op_wrapper.py) " +
               "--library=$(location %s) --tf_version_file=$(location @local_config_tf//:tf_version.txt) " +
               "--output=$@") % library,
        message = "Generating Python op wrappers " + name + ".py",
    )
