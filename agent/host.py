"""What the agent asks of the machine it runs on: the boot id and whether the
kernel's clock is synchronised (read-only questions with a safe answer when
the machine cannot be asked: "unknown", None), the C library itself, and a
lower scheduling priority for a thread doing background work."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from functools import cache
from pathlib import Path
from typing import Any

__all__ = ["BACKGROUND_NICE", "background_thread", "boot_id", "kernel_clock_synced", "libc"]

# A thread checking and storing an access list runs this much nicer than the gate thread:
# where the CPUs are busy the kernel gives the gate thread its CPU first (a nice-5 thread
# gets about a quarter of a CPU another thread wants), yet the list still gets on.
BACKGROUND_NICE = 5

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


def background_thread(step: int = BACKGROUND_NICE) -> int | None:
    """Make the calling thread ``step`` nicer than it is (Linux: setpriority on its
    thread id applies to that thread alone; any user may lower a priority). The
    new niceness, or None where that cannot be done. For threads that exist only
    for background work (the access list's worker, the delta log's fold): it is
    never given back."""
    if not hasattr(os, "setpriority") or not hasattr(threading, "get_native_id"):
        return None
    try:
        tid = threading.get_native_id()
        nice = os.getpriority(os.PRIO_PROCESS, tid) + step
        os.setpriority(os.PRIO_PROCESS, tid, nice)
        return os.getpriority(os.PRIO_PROCESS, tid)
    except OSError:
        return None
