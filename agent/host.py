"""What the agent asks of the machine it runs on: the boot id and whether the
kernel's clock is synchronised (read-only questions with a safe answer when
the machine cannot be asked: "unknown", None), and the C library itself."""
from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache
from pathlib import Path
from typing import Any

__all__ = ["boot_id", "kernel_clock_synced", "libc"]

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def boot_id() -> str:
    """This boot's id (records carry it beside the monotonic time); "unknown" off Linux."""
    try:
        return BOOT_ID.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


class _Timex(ctypes.Structure):
    # The leading fields of struct timex (sys/timex.h); the kernel writes more, hence _rest.
    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("_rest", ctypes.c_byte * 512),
    ]


_TIME_ERROR = 5
_STA_UNSYNC = 0x0040


def kernel_clock_synced() -> bool | None:
    """Whether the kernel considers the clock NTP-synchronised (what
    ``timedatectl``'s NTPSynchronized reads: adjtimex, read-only), None when
    it cannot be asked."""
    lib = libc()
    if lib is None:
        return None
    try:
        tx = _Timex()
        state = lib.adjtimex(ctypes.byref(tx))
    except AttributeError:
        return None
    if state < 0:
        return None
    return state != _TIME_ERROR and not (tx.status & _STA_UNSYNC)


@cache
def libc() -> Any:
    """The C library through ctypes (errno kept), or None where it cannot be loaded.
    A ctypes call releases the interpreter lock while it runs."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
