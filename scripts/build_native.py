"""Build semantic_cli.backend._native, the optional compiled restore loops and batched-decode
matmul (see semantic_cli/backend/_native.cpp).

    .venv/bin/python scripts/build_native.py [--force]

Run by `make setup`, and again whenever the source, this script or the
installed mlx is newer than the built module. It never fails the set-up:
without a C++ compiler, nanobind, or an mlx whose nanobind internals this
build can share, it says why in one line and semantic restores from Python
instead (slower by a few milliseconds per 1K tokens restored) and decodes
batches with OpenBLAS alone (~15% fewer tokens per second at 4 sequences).
Without xxhash.h (Debian: libxxhash-dev) the module reads no files.
The module is checked in a separate process before it is put in place.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "semantic_cli" / "backend" / "_native.cpp"
TARGET = ROOT / "semantic_cli" / "backend" / f"_native{sysconfig.get_config_var('EXT_SUFFIX')}"
XXHASH_DIRS = ("/usr/include", "/usr/local/include", "/opt/homebrew/include")

# What the built module must do before it replaces the old one: hand back
# mlx arrays (so its nanobind shares mlx's type registry) that are writable
# and separate, for the mlx it was built against, and refuse a size that
# overflows; read files into views in order with python-xxhash's digest, and
# report a file that ends too soon.
SMOKE_TEST = """
import os, tempfile, xxhash
import mlx.core as mx, _native
a, b = _native.empty_arrays([[2, 3], [4]], [mx.float32, mx.uint16])
assert isinstance(a, mx.array) and a.shape == (2, 3) and b.dtype == mx.uint16
memoryview(a).cast("B")[:] = bytes(24)
memoryview(b).cast("B")[:] = b"\\x01\\x00" * 4
assert mx.array_equal(a, mx.zeros((2, 3))).item() and mx.array_equal(b, mx.ones(4, dtype=mx.uint16)).item()
assert _native.mlx_version == mx.__version__
try:  # a size product that overflows raises, never allocates a smaller buffer
    _native.empty_arrays([[1 << 30, 1 << 30, 1 << 30]], [mx.float32])
    raise AssertionError("empty_arrays has no overflow check")
except ValueError:
    pass
if hasattr(_native, "few_rows_matmul"):  # a batch's decode-step matmul
    x, w = mx.random.normal((3, 20)), mx.random.normal((40, 200))[:, :20]
    assert mx.allclose(_native.few_rows_matmul(x, w, 3), x @ w.T, atol=1e-4).item()
if hasattr(_native, "Reader"):
    data = os.urandom(300_000)
    with tempfile.TemporaryFile() as f, tempfile.TemporaryFile() as g:
        f.write(b"head" + data)
        f.flush()
        g.write(data[:1000])
        g.flush()
        views = [memoryview(bytearray(n)) for n in (100_000, 150_000, 50_000)]
        reader = _native.Reader(65536, 2)
        reader.submit(f.fileno(), 4, views, b"head")
        reader.submit(g.fileno(), 0, [memoryview(bytearray(1001))], b"")
        (status, digest), (ended, _) = reader.finish()
        assert status == 0 and b"".join(views) == data, status
        assert digest == xxhash.xxh3_64(b"head" + data).hexdigest(), digest
        assert ended == -1, ended
        reader.abort()  # after finish: nothing left to do
"""


def main(argv: list[str]) -> int:
    try:
        import mlx.core
        import nanobind
    except ImportError as exc:
        return _skip(f"{exc.name} is not installed")
    mlx_dir = Path(mlx.core.__file__).parent
    libmlx = next(iter(sorted((mlx_dir / "lib").glob("libmlx.*"))), None)
    if libmlx is None:
        return _skip(f"no libmlx in {mlx_dir / 'lib'}")
    inputs = (SOURCE, Path(__file__).resolve(), libmlx)
    if "--force" not in argv and TARGET.exists() and TARGET.stat().st_mtime >= max(p.stat().st_mtime for p in inputs):
        return 0  # up to date
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        return _skip("no C++ compiler (install g++ or clang)")
    nb_src = Path(nanobind.source_dir())
    xxhash_dir = xxhash_include_dir()
    with tempfile.TemporaryDirectory() as tmp:
        built = Path(tmp) / TARGET.name
        command = [
            compiler,
            "-O2",
            "-std=c++20",
            "-shared",
            "-fPIC",
            "-fvisibility=hidden",
            "-fno-strict-aliasing",
            "-DNDEBUG",
            "-DNB_DOMAIN=mlx",  # mlx keeps its nanobind types in this domain
            f'-DSEMANTIC_MLX_VERSION="{mlx.core.__version__}"',
            f"-I{nanobind.include_dir()}",
            f"-I{nb_src.parent / 'ext' / 'robin_map' / 'include'}",
            f"-I{sysconfig.get_paths()['include']}",
            f"-I{mlx_dir / 'include'}",
            str(nb_src / "nb_combined.cpp"),
            str(SOURCE),
            f"-L{libmlx.parent}",
            "-lmlx",
            f"-Wl,-rpath,{libmlx.parent}",
            "-o",
            str(built),
        ]
        if xxhash_dir is not None:
            command[1:1] = ["-DSEMANTIC_HAVE_XXHASH", f"-I{xxhash_dir}"]
        if platform.machine() in ("x86_64", "AMD64"):
            # Built where it runs: xxh3 and the batched matmul take AVX2/AVX-512 where the CPU has
            # them (SSE2 hashes at half the speed, and the matmul would lose to OpenBLAS).
            command.insert(1, "-march=native")
        if sys.platform == "darwin":
            command.insert(1, "-undefined")
            command.insert(2, "dynamic_lookup")
        try:
            compiled = subprocess.run(command, capture_output=True, text=True, timeout=600)
            if compiled.returncode != 0:
                last = (compiled.stderr.strip().splitlines() or ["(no output)"])[-1]
                return _skip(f"the compiler failed: {last}")
            checked = subprocess.run([sys.executable, "-c", SMOKE_TEST], cwd=tmp, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired as exc:
            return _skip(f"{Path(str(exc.cmd[0])).name} took longer than {exc.timeout:.0f} s")
        if checked.returncode != 0:
            last = (checked.stderr.strip().splitlines() or [f"exit code {checked.returncode}"])[-1]
            return _skip(f"the built module does not work with mlx {mlx.core.__version__}: {last}")
        # Copy, then rename into place: a running semantic keeps the module it mapped.
        partial = TARGET.with_name(TARGET.name + ".partial")
        shutil.copyfile(built, partial)
        os.chmod(partial, 0o755)
        os.replace(partial, TARGET)
    reads = "allocation, hashed reads, batched matmul, softmax"
    if xxhash_dir is None:
        reads = "allocation, batched matmul, softmax (no xxhash.h: install libxxhash-dev for hashed reads)"
    print(f"native module: built {TARGET.name} for mlx {mlx.core.__version__}: {reads}")
    return 0


def xxhash_include_dir() -> str | None:
    """Where xxhash.h is, if anywhere: the native reads are built only with it."""
    return next((d for d in XXHASH_DIRS if (Path(d) / "xxhash.h").exists()), None)


def _skip(reason: str) -> int:
    TARGET.unlink(missing_ok=True)  # never leave a module built for something else
    print(f"note: native module not built ({reason}); restores run in Python, a few ms slower, and batches decode with OpenBLAS")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
