"""The C heap's policy for one ``lstmlab-train`` process, set before its first model.

glibc's malloc starts a process returning freed memory to the kernel eagerly: blocks from 128 KiB are
mapped and unmapped one by one, and free memory at the top of the heap is trimmed beyond 128 KiB. It
raises both thresholds as it sees large blocks freed (up to 32 MiB and 64 MiB), so a long process
settles. Until then every training step of the first model faults its buffers in afresh. Measured on
the compare preset (2-vCPU EPYC, torch 2.13): the first model of the process took 270–550 page
faults per step and the models after it 0–20, whichever model came first. That made the first
model about 5–10 % slower per step than the same model run later: the sweep measured its order,
not its models.

``lstmlab-train`` therefore starts where glibc's own rule ends: blocks below 32 MiB come from the
heap, and up to 64 MiB of free heap is kept for reuse. It costs at most that much resident memory
that glibc would have given back; free heap beyond it and blocks of 32 MiB or more go back to the
kernel as before. ``LSTMLAB_MALLOC=glibc`` leaves glibc's defaults.

The library itself (``import lstmlab``, ``train(cfg)``) never touches the allocator: this is the
command's choice for its own process, as ``torch.backends.xeon.run_cpu`` makes it by preloading
another allocator.
"""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt's parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit, where its dynamic rule stops, and the trim threshold
# that rule sets with it (twice the mmap threshold)
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD

OPT_OUT = "LSTMLAB_MALLOC"


def keep_freed_memory() -> str:
    """Set glibc malloc's thresholds to where its dynamic rule settles (see the module docstring),
    once for this process, unless ``LSTMLAB_MALLOC=glibc``. Returns one line saying what was done
    (or why nothing was) for the run's log."""
    choice = os.environ.get(OPT_OUT, "")
    if choice == "glibc":
        return f"glibc malloc's defaults ({OPT_OUT}=glibc)"
    if choice:
        raise ValueError(f"{OPT_OUT} must be unset or 'glibc' (glibc malloc's defaults), got {choice!r}")
    libc_name, _ = platform.libc_ver()
    if libc_name != "glibc":
        return f"the platform's allocator, unchanged (not glibc: {libc_name or platform.system()})"
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    refused = [
        name
        for name, param, value in (
            ("M_MMAP_THRESHOLD", M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            ("M_TRIM_THRESHOLD", M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        )
        if mallopt(param, value) != 1
    ]
    if refused:
        return (
            f"glibc malloc refused {', '.join(refused)}: its defaults apply (the first model may run slower)"
        )
    return (
        f"glibc malloc keeps freed memory up to {TRIM_THRESHOLD >> 20} MiB and maps blocks from "
        f"{MMAP_THRESHOLD >> 20} MiB, so that each step does not fault its buffers in afresh "
        f"({OPT_OUT}=glibc: glibc's defaults)"
    )
