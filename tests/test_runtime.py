"""The process-wide runtime settings every stage applies (``model.set_threads``)."""

import ctypes
import json
import subprocess
import sys

import pytest

# In a fresh interpreter: where glibc puts a 64 MiB tensor before and after the setting.
# mallinfo2's hblkhd is the bytes held in mmap'ed blocks, arena the bytes of the heap and
# uordblks the heap's bytes in use.
CHILD = """
import ctypes, json, torch
from pythia_attribution.model import keep_freed_memory_for_reuse

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info

def where(applied):
    before = libc.mallinfo2()
    block = torch.ones(16 << 20)
    during = libc.mallinfo2()
    del block
    after = libc.mallinfo2()
    return {"applied": applied, "mmap": during.hblkhd - before.hblkhd,
            "heap_used": during.uordblks - before.uordblks, "heap_grown": during.arena - before.arena,
            "heap_trimmed": during.arena - after.arena}

first = where(None)
second = where(keep_freed_memory_for_reuse())
start = libc.mallinfo2().arena
again = [where(True) for _ in range(8)]
print(json.dumps([first, second, again, libc.mallinfo2().arena - start]))
"""


def test_large_blocks_come_from_the_heap_and_stay_for_reuse():
    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("not glibc 2.33 or later")
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
    default, applied, again, grown = json.loads(out.stdout.strip().splitlines()[-1])
    size = 64 << 20
    assert default["mmap"] >= size and default["heap_used"] < size  # glibc's default: a fresh mapping
    assert applied["applied"] is True
    assert applied["mmap"] == 0 and applied["heap_used"] >= size  # now from the heap
    assert applied["heap_trimmed"] == 0  # and kept there once freed
    # Eight more blocks of the same size, one after the other: all from the heap, which grows by
    # far less than eight blocks. Not by zero: a small allocation between two rounds may take the
    # front of the freed block, so that the next block grows the top (seen once in a CI run, by
    # exactly one block); two blocks leave room for that and still fail without reuse.
    assert all(a["mmap"] == 0 and a["heap_used"] >= size for a in again)
    assert grown <= 2 * size, grown


# In a fresh interpreter: the CLI's cap on the kernels' instruction set, then torch's own report.
ISA_CHILD = """
import json, os
from pythia_attribution.cli import hold_cpu_isa
applied = hold_cpu_isa("avx2")
import torch
print(json.dumps({"applied": applied, "capability": torch.backends.cpu.get_cpu_capability()}))
"""


def _isa_child(env: dict) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", ISA_CHILD], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cpu_isa_caps_torchs_kernels_before_torch_loads_and_leaves_the_users_choice(monkeypatch):
    """runtime.cpu_isa = 'avx2': torch's kernels run with AVX2 at most (on an AVX-512 machine its
    own choice would be AVX512); a variable the user set wins; once torch is loaded nothing is set."""
    import os

    from pythia_attribution.cli import CPU_ISA_ENV, hold_cpu_isa

    env = {k: v for k, v in os.environ.items() if k not in CPU_ISA_ENV["avx2"]}
    got = _isa_child(env)
    assert got["applied"] == CPU_ISA_ENV["avx2"]
    assert got["capability"] in ("AVX2", "DEFAULT"), got  # never AVX512, whatever the machine has
    got = _isa_child({**env, "ATEN_CPU_CAPABILITY": "default"})
    assert "ATEN_CPU_CAPABILITY" not in got["applied"] and got["capability"] == "DEFAULT"
    import torch  # noqa: F401  (loaded in this process: too late to choose its kernels)

    environ: dict[str, str] = {}
    assert hold_cpu_isa("avx2", environ) == {} and environ == {}
    assert hold_cpu_isa("", environ) == {}
