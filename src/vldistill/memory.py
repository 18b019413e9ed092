"""Keep the C heap from hoarding freed batches (glibc only).

A training or evaluation step allocates and frees the same few large buffers every batch (float pixels: 12 bytes per
pixel of each image, activations). glibc serves blocks of at least ``M_MMAP_THRESHOLD`` bytes with ``mmap`` and
returns them on ``free``, but by default it raises that threshold to the size of any mmapped block that is freed
(up to 32 MiB on 64-bit). From then on same-sized buffers come from the heap arenas, whose free space glibc keeps:
measured on a 600 MB image store (``tests/test_memory.py``), a process's private memory then grew by +227 to +615 MB
in some runs instead of the usual +58 to +73 MB. A fixed threshold turns the dynamic adjustment off, so that large
buffers always go back to the OS.

:func:`return_large_blocks` is called by every stage at start-up (:func:`vldistill.cli.parse`) and by every loader
worker (:mod:`vldistill.data.datasets`). Setting glibc's own ``MALLOC_MMAP_THRESHOLD_`` in the environment takes
precedence (then nothing is changed here).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform

M_MMAP_THRESHOLD = -3
"""``mallopt`` parameter number of the mmap threshold (glibc's ``malloc.h``)."""
MMAP_THRESHOLD = 1 << 20
"""Blocks of 1 MiB or more are mapped and unmapped: a batch's pixel tensors are, a token's hidden state is not."""


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (whose ``mallopt`` this module sets), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def return_large_blocks(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes in this process (and in the processes it forks from now
    on); True when it was set, False where the C library is not glibc or ``MALLOC_MMAP_THRESHOLD_`` is set."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    libc = _glibc()
    return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, threshold))
