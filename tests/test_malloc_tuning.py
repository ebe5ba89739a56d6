"""The daemon's malloc tuning (``daemon.tune_malloc``): the 1 MiB buffers every FUSE write and
read allocates and frees stay in the heap instead of being returned to the kernel and faulted
back in, zeroed, by the next request (a third of the daemon's CPU during a large `dd`)."""
from __future__ import annotations

import subprocess
import sys

_FAULTS = """
import resource, sys
if sys.argv[1] == "tuned":
    from ossfuse.daemon import tune_malloc
    assert tune_malloc()
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(100):
        a = bytes(1 << 20)  # as a FUSE write: libfuse's copy of its data, then the ciphertext
        b = bytes(1 << 20)
        del a, b
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()
print(faults())
"""


def _page_faults(variant: str) -> int:
    """Minor page faults of 100 rounds of two 1 MiB allocations freed again, in a fresh
    interpreter (malloc's state is per process)."""
    r = subprocess.run([sys.executable, "-c", _FAULTS, variant], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return int(r.stdout)


def test_tuned_malloc_reuses_the_heap_for_request_sized_buffers():
    untuned, tuned = _page_faults("default"), _page_faults("tuned")
    # glibc's defaults trim the heap at each free and fault pages back in at the next
    # allocation (3,600 faults here, 36 a round); tuned, nothing once warm
    assert untuned >= 1000, untuned
    assert tuned < 100, tuned
