"""The C kernels of pair_stats (audit/weights/pair_kernels.c), loaded with ctypes from the installed package.

The library is built at install time as the optional extension ``audit.weights._pair_kernels`` (setup.py;
function multiversioning picks AVX-512, AVX2 or baseline code at load time) and is only ever loaded
from beside this file: never compiled at run time, never from a cache or temporary folder another user
could write to. Where it is absent (no C compiler at install), or with AUDIT_NATIVE=0, ``kernels()``
is None and pair_stats takes its torch path, which gives the same numbers to float32 rounding.
ctypes drops the interpreter lock around each call, so the audit's two workers run the kernels side
by side.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import os
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("pair_kernels.c")
DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # what the kernels read; other dtypes take the torch path


def enabled() -> bool:
    return os.environ.get("AUDIT_NATIVE", "1") != "0"


def library_path() -> Path | None:
    """The built extension beside this file (audit/weights/_pair_kernels<suffix>), or None when it was not built."""
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        p = here / f"_pair_kernels{suffix}"
        if p.is_file():
            return p
    return None


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


@functools.lru_cache(maxsize=None)
def _load() -> Kernels | None:
    lib = library_path()
    if lib is None:
        return None
    try:
        return Kernels(ctypes.CDLL(str(lib)))
    except (OSError, AttributeError):  # a library of another platform, or without the symbols
        return None


def built() -> bool:
    """Whether the installed package has the kernels (kept for callers that announced a first build)."""
    return library_path() is not None


def kernels() -> Kernels | None:
    """The kernels, or None (not built at install, or AUDIT_NATIVE=0): callers then use torch."""
    return _load() if enabled() else None


def usable(*xs: torch.Tensor) -> bool:
    """Whether the kernels can read these tensors in place: CPU, contiguous, float32 or bfloat16."""
    return all(x.device.type == "cpu" and x.dtype in DTYPES and x.is_contiguous() for x in xs)
