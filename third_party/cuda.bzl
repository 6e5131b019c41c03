"""Build macros for the GPU kernels, which Bazel builds where cuda_configure
found a toolkit, with setup.py's nvcc flags."""

load("@local_config_cuda//:cuda_flags.bzl", "CUDA_VERSION", "NVCC", "NVCC_FLAGS")

def if_cuda(if_true, if_false = []):
    """`if_true` where the build has a CUDA toolkit, else `if_false`."""
    return if_true if CUDA_VERSION != None else if_false

def cuda_object(name, src, hdrs):
    """Compiles the CUDA source `src` with nvcc into `name`.o; nothing without
    a toolkit (refer to the object through if_cuda)."""
    if CUDA_VERSION == None:
        return
    native.genrule(
        name = name,
        srcs = [src] + hdrs,
        outs = [name + ".o"],
        cmd = "%s %s -c $(location %s) -o $@" % (NVCC, " ".join(NVCC_FLAGS), src),
        message = "nvcc " + src,
    )
