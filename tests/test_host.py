"""agent.host: the C library and the allocator setting the service runs with."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from agent import host

# In a child process (the setting is process-wide): free a 20 MiB block, which
# raises glibc's dynamic mmap threshold to 20 MiB, then allocate 4 MiB and say
# whether it got a mapping of its own (mallinfo2's hblks counts them).
_CHILD = textwrap.dedent("""
    import ctypes, sys
    from agent import host
    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                     "fsmblks", "uordblks", "fordblks", "keepcost")]
    lib = host.libc()
    lib.mallinfo2.restype = MallInfo2
    lib.malloc.restype = ctypes.c_void_p
    lib.malloc.argtypes = (ctypes.c_size_t,)
    lib.free.argtypes = (ctypes.c_void_p,)
    if sys.argv[1] == "tuned":
        assert host.tune_malloc()
    lib.free(lib.malloc(20 << 20))
    before = lib.mallinfo2().hblks
    p = lib.malloc(4 << 20)
    print(lib.mallinfo2().hblks - before)
    lib.free(p)
""")


def _own_mappings(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip())


@pytest.mark.skipif(host.libc() is None or not hasattr(host.libc(), "mallinfo2"),
                    reason="not glibc 2.33 or later")
def test_tune_malloc_gives_big_blocks_their_own_mapping():
    # glibc as it comes: after a 20 MiB block was freed, 4 MiB come from the heap...
    assert _own_mappings("default") == 0
    # ...tuned as the service runs: a mapping of its own (grows by mremap, freed at once).
    assert _own_mappings("tuned") == 1
