"""The machine's state before a timed step of a benchmark."""

from __future__ import annotations

import mmap


def touch_free_memory(size: int) -> None:
    """Write ``size`` bytes of anonymous memory, then free it.

    This VM reports free memory to its host (virtio-balloon free page
    reporting: free 2 MiB blocks are handed back after ~2 s), and the first
    touch of a handed-back page faults in the host: writing 1 GiB into the page
    cache then takes 1-2.6 s of system time instead of 0.5. Which tool met such
    pages depended on the order of the steps -- the one that ran after an idle
    spell took the cold memory, the next one reused the pages the first freed --
    so with 3 reps the tool that went first twice lost (our cold pull: sys 0.9-2.6
    s when first, in /proc/vmstat 84k-236k pages taken from whole free blocks;
    s5cmd second: 0.65 s, 1k-73k pages). A real node's free memory is always
    backed; touching ``size`` bytes (2x the data) before every timed step gives
    both tools that: 3 runs each way, our cold pull 0.55x, 0.50x s5cmd without,
    0.92x with (s5cmd's own time the same). It matters where a bench leaves
    gigabytes free and idle between steps (bench_s3.py drops buckets and waits
    for SeaweedFS to settle); bench_local.py's steps free only what the step
    before wrote and start at once. Costs ~0.3 s per GiB, untimed."""
    if size <= 0:
        return
    block = b"\x01" * (64 << 20)
    with mmap.mmap(-1, size) as area:
        for _ in range(size // len(block)):
            area.write(block)
