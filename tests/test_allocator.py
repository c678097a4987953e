"""lstmlab-train's heap policy (lstmlab/runner/allocator.py): freed memory stays for the next step
instead of being faulted in afresh, and LSTMLAB_MALLOC=glibc leaves glibc's defaults. Each probe
runs in a fresh process: mallopt cannot be undone within one."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from lstmlab.runner import allocator

needs_glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

# Allocates, touches and frees 16 MiB in 64 KiB blocks (the heap, below every mmap threshold) twice,
# and prints the policy's line and the page faults of the second round. glibc's defaults trim the
# freed top of the heap (beyond 128 KiB), so the second round faults every page in again.
PROBE = textwrap.dedent(
    """
    import ctypes, resource
    from lstmlab.runner import allocator

    note = allocator.keep_freed_memory()
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]

    def round_trip():
        blocks = [libc.malloc(1 << 16) for _ in range(256)]
        for b in blocks:
            ctypes.memset(b, 1, 1 << 16)
        for b in reversed(blocks):
            libc.free(b)

    round_trip()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    round_trip()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(note)
    """
)


def probe(env_value: str | None) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != allocator.OPT_OUT}
    env.update({} if env_value is None else {allocator.OPT_OUT: env_value})
    # glibc reads MALLOC_*_ environment variables too: the probe must see its defaults
    env = {k: v for k, v in env.items() if not k.startswith("MALLOC_")}
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    faults, note = proc.stdout.splitlines()
    return int(faults), note


@needs_glibc
def test_freed_memory_is_kept_for_the_next_step():
    faults, note = probe(None)
    assert note.startswith("glibc malloc keeps freed memory up to 64 MiB and maps blocks from 32 MiB")
    assert faults < 256, f"{faults} page faults re-allocating 16 MiB that was just freed (4096 pages)"


@needs_glibc
def test_opting_out_leaves_glibc_defaults():
    faults, note = probe("glibc")
    assert note == "glibc malloc's defaults (LSTMLAB_MALLOC=glibc)"
    # the contrast that makes the test above meaningful: glibc gave the 16 MiB back
    assert faults > 2048, f"only {faults} page faults: glibc's defaults kept the freed memory"


def test_an_unknown_choice_is_an_error(monkeypatch):
    monkeypatch.setenv(allocator.OPT_OUT, "jemalloc")
    with pytest.raises(ValueError, match=r"LSTMLAB_MALLOC must be unset or 'glibc' .*got 'jemalloc'"):
        allocator.keep_freed_memory()
