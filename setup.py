"""Build of normkit's optional compiled CPU kernels (``normkit._C``).

Everything else is in pyproject.toml. The extension needs torch at build time, so it is built
when torch is importable in the build environment (``pip install --no-build-isolation``, as
``make install`` does); without torch or a C++ compiler the install still succeeds and normkit
runs its numba kernels instead (and says so once, on first use).
"""

import os
import sys

from setuptools import setup

ext_modules = []
cmdclass = {}
if os.environ.get("NORMKIT_NO_EXTENSION") != "1":
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("normkit: torch is not importable at build time; skipping the compiled kernels", file=sys.stderr)
    else:

        class OptionalBuildExtension(BuildExtension):
            """A failed compile skips the extension instead of failing the install."""

            def build_extensions(self):
                self._failed = []
                try:
                    super().build_extensions()
                except Exception as exc:  # before any compile: no usable compiler (torch's ABI check)
                    self._failed = list(self.extensions)
                    print(f"normkit: cannot build the compiled kernels ({exc}); normkit will use its numba kernels", file=sys.stderr)
                # nothing to copy or install for what failed (editable installs copy every listed one)
                self.extensions = [e for e in self.extensions if e not in self._failed]

            def build_extension(self, ext):
                try:
                    super().build_extension(ext)
                except Exception as exc:  # no compiler, missing headers, ...
                    self._failed.append(ext)
                    print(f"normkit: building {ext.name} failed ({exc}); normkit will use its numba kernels", file=sys.stderr)

        # -fno-math-errno / -fno-trapping-math: the results are the same (no errno, no FP exception
        # flags are read), and without them GCC will not vectorize loops holding floor / selects
        # (the exp polynomial of the recurrent steps). No -ffast-math: NaN, Inf and the order of
        # every sum stay as written.
        compile_args = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-Wno-unused-function"]
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
                ["src/normkit/csrc/norm_cpu.cpp", "src/normkit/csrc/rnn_cpu.cpp", "src/normkit/csrc/norm_dim_cpu.cpp"],
                include_dirs=[os.path.abspath("src/normkit/csrc")],
                extra_compile_args=compile_args,
                extra_link_args=link_args,
            )
        ]
        cmdclass = {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
