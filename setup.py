"""Build of normkit's compiled CPU kernels (``normkit._C``).

Everything else is in pyproject.toml. The extension is compiled against the torch of the build
environment: pyproject's ``[build-system] requires`` brings one to an isolated build
(``pip install .``, an sdist, ``python -m build``); ``make install`` builds without isolation
against the pinned torch it installed first. The build then

- pins the runtime dependency to that torch release (``torch==X.Y.Z``), since a C++ extension
  runs only with the torch it was compiled against, and
- records that torch version and its C++ ABI flag (``normkit/_C_build_info.py`` beside the
  extension, and compiled into ``_C`` itself), which the loader
  (:mod:`normkit.backends.cpu`) checks before it imports ``_C``: another torch gets a clear
  message saying how to rebuild, never a crash.

Without torch, without a usable C++ compiler, or on a platform the kernels do not build on
(they use GCC/Clang extensions: ``vector_size``, ``target_clones``), the install still succeeds
without the extension, says why once here, and normkit runs torch's own ops (it says so once
more on first use). ``NORMKIT_NO_EXTENSION=1`` skips the build.
"""

import os
import sys

from setuptools import setup

ext_modules = []
cmdclass = {}
install_requires = ["torch>=2.4", "numpy>=1.24"]


def _skip(reason: str) -> None:
    print(f"normkit: not building the compiled CPU kernels: {reason}; normkit will run torch's own ops", file=sys.stderr)


def _build_info_source(torch) -> str:
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return (
        '"""Written by setup.py when normkit._C was compiled: the torch it was built against."""\n\n'
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"CXX11_ABI = {abi}\n"
    )


if os.environ.get("NORMKIT_NO_EXTENSION") == "1":
    _skip("NORMKIT_NO_EXTENSION=1")
elif not sys.platform.startswith("linux"):
    _skip(f"platform {sys.platform!r} (the kernels are built and tested on Linux with GCC or Clang)")
else:
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        _skip("torch is not importable at build time")
    else:
        release = torch.__version__.split("+")[0]

        class OptionalBuildExtension(BuildExtension):
            """A failed compile skips the extension instead of failing the install; a successful
            one writes ``_C_build_info.py`` beside it."""

            def build_extensions(self):
                self._failed = []
                try:
                    super().build_extensions()
                except Exception as exc:  # before any compile: no usable compiler (torch's ABI check)
                    self._failed = list(self.extensions)
                    _skip(f"no usable C++ compiler ({exc})")
                # nothing to copy or install for what failed (editable installs copy every listed one)
                self.extensions = [e for e in self.extensions if e not in self._failed]

            def build_extension(self, ext):
                try:
                    super().build_extension(ext)
                except Exception as exc:  # missing headers, a compile error, ...
                    self._failed.append(ext)
                    _skip(f"building {ext.name} failed ({exc})")
                    return
                # beside the built extension, and beside the copy an in-place / editable build
                # puts in the source tree
                dirs = {os.path.dirname(self.get_ext_fullpath(ext.name))}
                if self.inplace or getattr(self, "editable_mode", False):
                    dirs.add(os.path.join(os.path.dirname(os.path.abspath(__file__)), "src", "normkit"))
                for d in dirs:
                    os.makedirs(d, exist_ok=True)
                    with open(os.path.join(d, "_C_build_info.py"), "w") as f:
                        f.write(_build_info_source(torch))

            def get_outputs(self):
                outputs = super().get_outputs()
                return outputs + [os.path.join(os.path.dirname(o), "_C_build_info.py") for o in outputs if "_C" in os.path.basename(o)]

        # -fno-math-errno / -fno-trapping-math: the results are the same (no errno, no FP exception
        # flags are read), and without them GCC will not vectorize loops holding floor / selects
        # (the exp polynomial of the recurrent steps). No -ffast-math: NaN, Inf and the order of
        # every sum stay as written. -fopenmp, not -fopenmp-simd: torch's intra-op pool is
        # OpenMP, and at::parallel_for is a header template whose `omp parallel` region is
        # compiled into this module; without -fopenmp it runs serially (measured: LayerNorm
        # 1024 x 1024 at 2 threads 2.4x slower than torch). The libgomp it links is the one
        # libtorch_cpu already loads. tests/test_build.py checks that 2 threads are used.
        # -falign-loops=64: each loop starts a 64-byte line, so a kernel's speed does not hang on
        # where the linker happens to place it. A change elsewhere in the library once moved the
        # row passes' unchanged code by 464 bytes and made bfloat16-output calls 5-9 % slower;
        # aligned, they came back (results/ab-2026-12-07c-*).
        compile_args = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-Wno-unused-function", "-falign-loops=64"]
        link_args = ["-fopenmp"]
        if os.environ.get("NORMKIT_SANITIZE") == "1":
            # `make sanitize`: AddressSanitizer + UndefinedBehaviorSanitizer, every finding fatal.
            # GCC's -fsanitize=undefined leaves out float-cast-overflow (a NaN or out-of-range
            # float converted to an int: the fast exp's old bug), so it is named. -O0 -g1 and one
            # instruction set (no target_clones) keep the build short (2 min of CPU for the three
            # files, against 4.3 min at -O1 -g: the torch headers dominate); the checks see the
            # same source, and the fuzz suite's tensors are small.
            sanitizers = "address,undefined,float-cast-overflow"
            compile_args = [
                "-O0", "-g1", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-Wno-unused-function",
                f"-fsanitize={sanitizers}", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all",
                "-DNORMKIT_NO_CLONES",
            ]
            link_args = ["-fopenmp", f"-fsanitize={sanitizers}"]
        ext_modules = [
            CppExtension(
                "normkit._C",
                [
                    "src/normkit/csrc/norm_cpu.cpp", "src/normkit/csrc/rnn_cpu.cpp", "src/normkit/csrc/norm_dim_cpu.cpp",
                    "src/normkit/csrc/fused_cpu.cpp", "src/normkit/csrc/fused_options_cpu.cpp", "src/normkit/csrc/fused_backward.cpp",
                    "src/normkit/csrc/norm_node.cpp",
                ],
                include_dirs=[os.path.abspath("src/normkit/csrc")],
                define_macros=[
                    ("NORMKIT_BUILT_TORCH", f'"{torch.__version__}"'),
                    ("NORMKIT_BUILT_CXX11_ABI", str(int(torch._C._GLIBCXX_USE_CXX11_ABI))),
                ],
                extra_compile_args=compile_args,
                extra_link_args=link_args,
            )
        ]
        cmdclass = {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}
        install_requires[0] = f"torch=={release}"

setup(ext_modules=ext_modules, cmdclass=cmdclass, install_requires=install_requires)
