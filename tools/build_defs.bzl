"""Build rules for tf_lora op libraries. The one place that owns their compile and link options.

    tf_lora_op_library(name = "_lora_ops.so", srcs = [...], gpu_srcs = [...])
        One op family: a shared library loadable by tf.load_op_library. gpu_srcs (*.cu.cc) are compiled
        with nvcc and linked in only under --config=cuda, which also defines GOOGLE_CUDA=1 for srcs.
    tf_lora_gen_op_wrapper(name = "gen_lora_ops", library = ":_lora_ops.so")
        Runs tools/gen_op_wrapper.py on the built library: TensorFlow's own Python op wrapper generator
        writes gen_lora_ops.py, which loads the library through tf_lora.python.ops._loader.
    tf_lora_cc_test(name, srcs, deps)
        A C++ test compiled with the same options, linked against TensorFlow's framework library.
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

def tf_lora_copts():
    return _COPTS + select({
        "//tools:using_cuda": _CUDA_COPTS,
        "//conditions:default": [],
    })

def _gpu_library(name, gpu_srcs, hdrs):
    """Compiles gpu_srcs with nvcc into an always-linked static library (docs/building.md, CUDA).

    No cudart is linked: libtensorflow_framework.so.2 exports the CUDA runtime entry points and forwards
    them to TensorFlow's own CUDA 12 runtime. `.lo` tells Bazel to link the archive whole (alwayslink).
    """
    objs = [src.replace("/", "_").replace(":", "_") + ".o" for src in gpu_srcs]
    native.genrule(
        name = name + "_nvcc",
        srcs = gpu_srcs + hdrs,
        outs = [name + ".lo"],
        cmd = " && ".join([
            "NVCC=$${NVCC:-nvcc}",
            "INC=$$(dirname $(location @local_config_tf//:tf_version.txt))/include",
            "OBJ=$$(mktemp -d)",
        ] + [
            ("$$NVCC -x cu -c $(location %s) -o $$OBJ/%s -DGOOGLE_CUDA=1 -DNDEBUG -O3 " +
             "--expt-relaxed-constexpr -Xcompiler -fPIC -I. -I$(GENDIR) -isystem $$INC " +
             "-isystem $$INC/third_party/gpus/cuda/include %s") % (src, obj, " ".join(TF_COPTS))
            for src, obj in zip(gpu_srcs, objs)
        ] + [
            "ar rcs $@ " + " ".join(["$$OBJ/" + obj for obj in objs]),
            "rm -rf $$OBJ",
        ]),
        tools = ["@local_config_tf//:tf_version.txt"],
        message = "Compiling CUDA sources of " + name,
    )
    native.cc_library(
        name = name,
        srcs = [name + ".lo"],
        alwayslink = 1,
    )

def tf_lora_op_library(name, srcs, gpu_srcs = [], deps = [], **kwargs):
    """A shared library of one op family, loadable with tf.load_op_library."""
    gpu_deps = []
    if gpu_srcs:
        hdrs = [s for s in srcs if s.endswith(".h")]
        _gpu_library(name + "_gpu", gpu_srcs, hdrs)
        gpu_deps = select({
            "//tools:using_cuda": [":" + name + "_gpu"],
            "//conditions:default": [],
        })
    native.cc_binary(
        name = name,
        srcs = srcs,
        copts = tf_lora_copts(),
        linkshared = 1,
        # TF's own link flags: the library needs libtensorflow_framework.so.2 by soname only (TensorFlow
        # has loaded it before any op library), with no RUNPATH into Bazel's output tree.
        linkopts = TF_LINKOPTS + ["-Wl,--no-undefined", "-pthread"],
        deps = deps + _TF_HEADERS + gpu_deps,
        **kwargs
    )

def tf_lora_cc_test(name, srcs, deps = [], size = "small", **kwargs):
    """A C++ test built with the op libraries' options."""
    native.cc_test(
        name = name,
        size = size,
        srcs = srcs,
        copts = tf_lora_copts(),
        linkopts = ["-pthread"],
        deps = deps + _TF_HEADERS + ["@local_config_tf//:libtensorflow_framework"],
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
