"""Which GPU architectures a wheel's CUDA kernels are built for, read from its fatbins.

A CUDA library embeds its kernels in fatbins: a header (magic 0xBA55ED50, version, header size,
payload size) followed by entries, each a header (kind: 1 PTX, 2 SASS machine code; header size;
payload size; ...; the architecture as a number, 90 for sm_90) and its payload. A GPU runs a
kernel whose SASS matches its architecture, or PTX of an architecture at or below it that the
driver compiles at load. H100 and H200 are sm_90: a wheel without SASS or PTX for 90 or below
that Hopper accepts fails with "no kernel image is available". No CUDA toolkit is needed here
(``cuobjdump --list-elf`` says the same on a machine that has one):

    pip download --no-deps --only-binary=:all: --python-version 3.11 \\
        --platform manylinux_2_28_x86_64 faiss-gpu==1.15.1 -d wheels
    python experiments/fatbin_archs.py wheels/faiss_gpu-1.15.1-*.whl

prints, for each shared library with kernels, the number of fatbins and, per kind and
architecture, how many of them hold it (README, "Real scale": the image's faiss-gpu).
"""

from __future__ import annotations

import argparse
import collections
import struct
import sys
import zipfile
from pathlib import Path

MAGIC = struct.pack("<I", 0xBA55ED50)
KINDS = {1: "ptx", 2: "sass"}


def archs(blob: bytes) -> tuple[int, collections.Counter]:
    """(fatbins found, Counter of (kind, arch) -> fatbins holding it) in a library's bytes. A match
    of the magic whose header is not a fatbin's (version 1, 16 bytes) is passed over, so that its
    size field cannot carry the search past real fatbins."""
    found = collections.Counter()
    count = 0
    pos = blob.find(MAGIC)
    while pos >= 0:
        version, header_size, payload_size = struct.unpack_from("<HHQ", blob, pos + 4)
        if (version, header_size) != (1, 16) or pos + 16 + payload_size > len(blob):
            pos = blob.find(MAGIC, pos + 4)
            continue
        entry, end = pos + header_size, pos + header_size + payload_size
        here = set()
        while entry + 32 <= end:
            kind, _, entry_header, entry_size = struct.unpack_from("<HHIQ", blob, entry)
            if entry_header == 0:
                break  # a malformed entry: the fatbin's remaining entries cannot be found
            (arch,) = struct.unpack_from("<I", blob, entry + 28)
            here.add((KINDS.get(kind, f"kind{kind}"), arch))
            entry += entry_header + entry_size
        found.update(here)
        count += 1
        pos = blob.find(MAGIC, end)
    return count, found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("wheels", nargs="+", type=Path, help="wheel files (.whl) or shared libraries")
    args = parser.parse_args(argv)
    for path in args.wheels:
        if not path.is_file():
            parser.error(f"{path}: no such file")
        if path.suffix == ".whl":
            with zipfile.ZipFile(path) as wheel:
                members = [(n, wheel.read(n)) for n in wheel.namelist() if ".so" in Path(n).name]
        else:
            members = [(path.name, path.read_bytes())]
        for name, blob in members:
            count, found = archs(blob)
            if count:
                kinds = ", ".join(f"{kind} sm_{arch}: {n}" for (kind, arch), n in sorted(found.items()))
                print(f"{path.name}: {name}: {count} fatbins; {kinds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
