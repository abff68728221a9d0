"""Build stage of Dockerfile.cuda: compile Triton's CUDA driver module (driver.c) into TRITON_CACHE_DIR
with the builder's C compiler, so the runtime stage, which has none, finds it in the cache.

Triton keys that module by its source and the platform only (triton/runtime/build.py), so the module
built against the CUDA stub library here is the one a GPU node loads, linking the real libcuda then.
Loading it here fails (no driver): only the cache entry matters.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Triton links `-l:libcuda.so.1`; the toolkit's stub is libcuda.so: give it the driver's name.
stub_dir = Path(tempfile.mkdtemp())
(stub_dir / "libcuda.so.1").symlink_to(Path(os.environ.get("CUDA_STUBS", "/usr/local/cuda/lib64/stubs")) / "libcuda.so")
os.environ["TRITON_LIBCUDA_PATH"] = str(stub_dir)

from triton.backends.nvidia import driver  # noqa: E402
from triton.runtime.build import compile_module_from_src  # noqa: E402

src = (Path(driver.__file__).parent / "driver.c").read_text()
try:
    compile_module_from_src(src=src, name="cuda_utils", library_dirs=driver.library_dirs(),
                            include_dirs=driver.include_dirs, libraries=driver.libraries)
except (ImportError, RuntimeError, OSError) as exc:  # no libcuda.so.1 to load at build time
    print(f"triton_prewarm: built, not loadable here ({exc})")
cache = Path(os.environ["TRITON_CACHE_DIR"])
built = sorted(cache.rglob("cuda_utils*.so"))
if not built:
    raise SystemExit("triton_prewarm: cuda_utils was not built")
print(f"triton_prewarm: {built[0]}")
