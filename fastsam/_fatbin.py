"""Which GPU architectures a compiled CUDA library carries code for, read from the file itself.

[note: arch check]
A build of ``fastsam._C`` for the wrong GPU (``TORCH_CUDA_ARCH_LIST=8.0`` run on an sm_90 machine
without PTX, or a wheel built on another box) loads fine and fails only at the first launch with
"no kernel image is available for execution on the device", in the middle of a training step. So
the first time the ``cuda`` backend is considered for a GPU, the extension's embedded code is
compared with that GPU's compute capability, and a mismatch makes the backend unavailable there
(``auto`` falls back, an explicit ``backend="cuda"`` raises with the reason).

The code lives in the ELF section ``.nv_fatbin``: one fat binary per translation unit, each a list
of entries (SASS for an ``sm_XY``, or PTX for a ``compute_XY``) whose headers give the
architecture. nvcc's rules decide what runs: SASS for ``sm_XY`` runs on a GPU of the same major
version and at least its minor (sm_80 on sm_86, not on sm_90); PTX for ``compute_XY`` is
JIT-compiled for any GPU of capability ``XY`` or later. The library passes when one of its fat
binaries has a usable entry: every kernel file of csrc/ is compiled with the same flags, and a
library linked against the static CUDA runtime also carries a kernel-less fat binary of SASS only,
which says nothing about our kernels. Unreadable files give ``None`` (no verdict) rather than a
guess.
"""

from __future__ import annotations

import struct
from pathlib import Path

FATBIN_MAGIC = 0xBA55ED50
KIND_PTX, KIND_SASS = 1, 2


def _elf_section(data: bytes, wanted: str) -> bytes | None:
    """The bytes of section ``wanted`` of a little-endian ELF64 file, or None."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    if shoff == 0 or shnum == 0 or shoff + shnum * shentsize > len(data):
        return None

    def header(i):
        name, _, _, _, offset, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        return name, offset, size

    _, str_off, str_size = header(shstrndx)
    names = data[str_off:str_off + str_size]
    for i in range(shnum):
        name, offset, size = header(i)
        end = names.find(b"\0", name)
        if names[name:end].decode(errors="replace") == wanted:
            return data[offset:offset + size]
    return None


def fatbin_entries(section: bytes) -> list[list[tuple[int, int]]]:
    """[(kind, arch)] per fat binary of a ``.nv_fatbin`` section (arch as 10 * major + minor)."""
    out = []
    pos = 0
    while pos + 16 <= len(section):
        magic, _version, header_size, fat_size = struct.unpack_from("<IHHQ", section, pos)
        if magic != FATBIN_MAGIC:
            pos += 8  # fat binaries are 8-byte aligned; skip padding
            continue
        entries = []
        entry = pos + header_size
        end = min(len(section), pos + header_size + fat_size)
        while entry + 32 <= end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", section, entry)
            arch, = struct.unpack_from("<I", section, entry + 28)
            if entry_header == 0:
                break
            entries.append((kind, arch))
            entry += entry_header + payload
        out.append(entries)
        pos = end
    return out


def runs_on(entries: list[tuple[int, int]], major: int, minor: int) -> bool:
    """Whether one translation unit's entries hold code a GPU of capability ``major.minor`` runs."""
    device = 10 * major + minor
    for kind, arch in entries:
        if kind == KIND_SASS and arch // 10 == major and arch % 10 <= minor:
            return True
        if kind == KIND_PTX and arch <= device:
            return True
    return False


def describe(entries: list[tuple[int, int]]) -> str:
    names = sorted({("sm_" if kind == KIND_SASS else "compute_") + str(arch) for kind, arch in entries})
    return ", ".join(names) or "nothing"


def incompatibility(path: str | Path, major: int, minor: int) -> str | None:
    """Why the library at ``path`` cannot run on a GPU of capability ``major.minor``.

    ``""`` when it can; ``None`` when the file holds no readable fat binary (no verdict).
    """
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    section = _elf_section(data, ".nv_fatbin")
    if section is None:
        return None
    units = [u for u in fatbin_entries(section) if u]
    if not units:
        return None
    if any(runs_on(u, major, minor) for u in units):
        return ""
    every = describe([e for u in units for e in u])
    return (f"the CUDA extension carries code for {every}, none of which runs on this sm_{major}{minor} GPU "
            f"(rebuild it with TORCH_CUDA_ARCH_LIST=\"{major}.{minor}\", or add +PTX to an older arch)")
