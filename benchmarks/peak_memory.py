"""Peak resident memory of a piece of work on Linux, for the benchmarks.

Run the benchmark with MALLOC_MMAP_THRESHOLD_=65536 so that glibc returns large freed blocks to
the system at once, and the resident set follows the live tensors.
"""

import os

MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> int:
    """Reset the high-water mark (a child's starts from its parent's); return the bytes held now."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # Linux >= 4.0
    return resident_bytes()


def peak_above(before: int) -> int:
    """The high-water mark since the last reset, above ``before`` bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 - before
    raise RuntimeError("VmHWM not found in /proc/self/status")
