"""The C kernels of pair_stats (checks/pair_kernels.c): compiled on first use, loaded with ctypes.

Compiled once per source and machine with the system C compiler into the suite's cache directory
($AUDIT_CACHE/kernels, default ~/.cache/moe-ablation-audit/kernels; a temporary one where that is not
writable), then reused. Where no compiler works, or with
AUDIT_NATIVE=0, ``kernels()`` is None and pair_stats takes its torch path, which gives the same
numbers to float32 rounding. ctypes drops the interpreter lock around each call, so the audit's two
workers run the kernels side by side.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("pair_kernels.c")
DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # what the kernels read; other dtypes take the torch path
FLAG_SETS = (["-O3", "-march=native"], ["-O3", "-mcpu=native"], ["-O3"])  # the first the compiler takes


def enabled() -> bool:
    return os.environ.get("AUDIT_NATIVE", "1") != "0"


def _cache_dir() -> Path:
    """$AUDIT_CACHE/kernels, as the organisms use $AUDIT_CACHE (default $XDG_CACHE_HOME or ~/.cache, /moe-ablation-audit)."""
    root = os.environ.get("AUDIT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moe-ablation-audit"
    return Path(root) / "kernels"


def _compile(src: Path, out: Path) -> bool:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return False
    out.parent.mkdir(parents=True, exist_ok=True)
    for flags in FLAG_SETS:
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            r = subprocess.run([cc, *flags, "-shared", "-fPIC", "-o", tmp, str(src)], capture_output=True, timeout=120)
            if r.returncode == 0:
                os.replace(tmp, out)  # atomic: a concurrent process sees the whole library or none
                return True
        except (OSError, subprocess.SubprocessError):
            pass
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return False


class Kernels:
    """The loaded library; argument types set once."""

    def __init__(self, lib: ctypes.CDLL):
        i64, vp, fp, dp = ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p
        self._project = lib.pk_project
        self._project.restype = ctypes.c_int
        self._project.argtypes = [vp, vp, ctypes.c_int, i64, i64, i64, fp, i64, fp, fp, dp, ctypes.c_int]
        self._apply_d = lib.pk_apply_d
        self._apply_d.restype = ctypes.c_int
        self._apply_d.argtypes = [vp, vp, ctypes.c_int, i64, i64, i64, fp, fp]
        self._sums = lib.pk_sums
        self._sums.restype = ctypes.c_int
        self._sums.argtypes = [vp, vp, ctypes.c_int, i64, dp]
        self._lut_u8 = lib.pk_lut_u8
        self._lut_u8.restype = ctypes.c_int
        self._lut_u8.argtypes = [vp, fp, i64, fp]

    @staticmethod
    def _ptr(t: torch.Tensor | None) -> int | None:
        return None if t is None else t.data_ptr()

    def project(self, x0: torch.Tensor, x1: torch.Tensor | None, R: torch.Tensor, a0: torch.Tensor, a1: torch.Tensor | None,
                sums: torch.Tensor | None = None, square: bool = False) -> None:
        """a0 (a1) += R @ x0 (x1) per column of the [H, P*Q] view of [P, H, Q] ``x0``; ``sums`` (float64,
        3 per column when Q = 1, else 3 per p) += |x0|^2, |x1|^2, |x1 - x0|^2; ``square``: R @ x0^2."""
        P, H, Q = x0.shape
        rc = self._project(x0.data_ptr(), self._ptr(x1), DTYPES[x0.dtype], P, H, Q, R.data_ptr(), R.shape[0],
                           a0.data_ptr(), self._ptr(a1), self._ptr(sums), int(square))
        if rc:
            raise ValueError("pk_project refused its arguments")

    def apply_d(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> None:
        """z [H] += (x1 - x0) t on the [H, P*Q] view."""
        P, H, Q = x0.shape
        if self._apply_d(x0.data_ptr(), x1.data_ptr(), DTYPES[x0.dtype], P, H, Q, t.data_ptr(), z.data_ptr()):
            raise ValueError("pk_apply_d refused its arguments")

    def lut_u8(self, codes: torch.Tensor, table: torch.Tensor, out: torch.Tensor) -> None:
        """out[i] = table[codes[i]] for contiguous uint8 ``codes``, a float32 [256] ``table`` and contiguous float32 ``out``."""
        if self._lut_u8(codes.data_ptr(), table.data_ptr(), codes.numel(), out.data_ptr()):
            raise ValueError("pk_lut_u8 refused its arguments")

    def sums(self, x0: torch.Tensor, x1: torch.Tensor, out: torch.Tensor) -> None:
        """out (float64 [3]) += |x0|^2, |x1|^2, |x1 - x0|^2 over contiguous ``x0``, ``x1``."""
        if self._sums(x0.data_ptr(), x1.data_ptr(), DTYPES[x0.dtype], x0.numel(), out.data_ptr()):
            raise ValueError("pk_sums refused its arguments")


_BUILD = threading.Lock()  # the audit's workers ask at once: one compiles, the other waits for it


@functools.lru_cache(maxsize=None)
def _load() -> Kernels | None:
    with _BUILD:
        return _build_or_reuse()


def _lib_paths() -> list[Path]:
    """Where the library for this source and machine is, or goes: the cache, else a temporary directory."""
    tag = hashlib.sha256(SOURCE.read_bytes() + platform.machine().encode() + platform.node().encode() + sys.platform.encode()).hexdigest()[:16]
    tmp = Path(tempfile.gettempdir()) / f"moe-ablation-audit-{os.getuid() if hasattr(os, 'getuid') else 0}"
    return [d / f"pair_kernels-{tag}.so" for d in (_cache_dir(), tmp)]


def built() -> bool:
    """Whether the library is already compiled (so ``kernels()`` will not take the ~10 s of a first build)."""
    return _load.cache_info().currsize > 0 or any(p.is_file() for p in _lib_paths())


def _build_or_reuse() -> Kernels | None:
    for lib in _lib_paths():
        try:
            if not lib.is_file() and not _compile(SOURCE, lib):
                return None  # no working compiler: another directory would not change that
            return Kernels(ctypes.CDLL(str(lib)))
        except OSError:  # this directory is not writable, or the library in it does not load: the next one
            continue
    return None


def kernels() -> Kernels | None:
    """The kernels, or None (no C compiler, or AUDIT_NATIVE=0): callers then use torch."""
    return _load() if enabled() else None


def usable(*xs: torch.Tensor) -> bool:
    """Whether the kernels can read these tensors in place: CPU, contiguous, float32 or bfloat16."""
    return all(x.device.type == "cpu" and x.dtype in DTYPES and x.is_contiguous() for x in xs)
