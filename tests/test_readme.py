"""Every ```python block of README.md runs as written, each in a fresh process.

A block gets only what a reader would bring: a tiny ``model`` (a block's ``model = ...`` line is
replaced by it), ``loader`` (a few ``(x, y)`` batches), one batch ``x``, ``y``, ``loss_fn``
(``torch.nn.functional.cross_entropy``, so ``reduction="none"`` works) and ``epochs``. Everything
else it imports or defines itself, or it declares with its first line:

* ``# (continues the block above)``: it runs after the block above, in the same process;
* ``# (runs under torchrun --nproc-per-node N)``: it runs as a file under ``torch.distributed.run``
  with N CPU processes (gloo) and initialises its own process group.

Blocks that are not meant to run use another fence language (```text, ```bash).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gloo_ranks import free_port

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CONTINUES = "# (continues the block above)"
TORCHRUN = re.compile(r"^# \(runs under torchrun --nproc-per-node (\d+)\)\s*$")

PRELUDE = '''\
import torch as _torch

_torch.manual_seed(0)


def _readme_model(nn=_torch.nn):
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


_g = _torch.Generator().manual_seed(0)
model = _readme_model()
loader = [(_torch.randn(16, 8, generator=_g), _torch.randint(0, 3, (16,), generator=_g)) for _ in range(3)]
x, y = loader[0]
loss_fn = _torch.nn.functional.cross_entropy
epochs = 2
del _torch, _g
'''


@dataclass
class Chain:
    """Blocks that run in one process: a block and the ones that continue it."""

    line: int                      # README line of the first block's fence
    code: list[str] = field(default_factory=list)
    nproc: int | None = None       # torchrun processes, or None for a plain interpreter


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line of the opening fence, dedented code) of every ```python block, indented ones (in lists) too."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = re.match(r"^(\s*)```python\s*$", lines[i])
        if not m:
            i += 1
            continue
        indent, start, body = m.group(1), i + 1, []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        blocks.append((start, textwrap.dedent("\n".join(body)) + "\n"))
        i += 1
    return blocks


def substitute_model(code: str) -> str:
    return re.sub(r"^(\s*)model = \.\.\.\s*$", r"\1model = _readme_model()", code, flags=re.M)


def chains(text: str) -> list[Chain]:
    out: list[Chain] = []
    for line, code in python_blocks(text):
        first = code.lstrip().splitlines()[0] if code.strip() else ""
        if first.strip() == CONTINUES:
            if not out:
                raise AssertionError(f"README.md:{line}: the first block cannot continue a block above")
            out[-1].code.append(substitute_model(code))
            continue
        m = TORCHRUN.match(first.strip())
        out.append(Chain(line, [substitute_model(code)], int(m.group(1)) if m else None))
    return out


CHAINS = chains(README.read_text(encoding="utf-8"))


def test_readme_has_python_blocks_and_markers_are_understood():
    assert len(CHAINS) >= 5
    sample = "```python\nmodel = ...\nprint(1)\n```\n\n  ```python\n  # (continues the block above)\n  print(2)\n  ```\n" \
             "```python\n# (runs under torchrun --nproc-per-node 2)\nprint(3)\n```\n"
    parsed = chains(sample)
    assert len(parsed) == 2 and parsed[0].nproc is None and parsed[1].nproc == 2
    assert "model = _readme_model()" in parsed[0].code[0] and parsed[0].code[1].startswith(CONTINUES)


@pytest.mark.parametrize("chain", CHAINS, ids=[f"line{c.line}" + (f"-torchrun{c.nproc}" if c.nproc else "")
                                                for c in CHAINS])
def test_readme_block_runs(chain, tmp_path):
    script = tmp_path / f"readme_line{chain.line}.py"
    script.write_text(PRELUDE + "\n" + "\n".join(chain.code))
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    if chain.nproc is None:
        cmd = [sys.executable, str(script)]
        attempts = 1
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(chain.nproc),
               "--master-addr", "127.0.0.1", "--master-port", "PORT", str(script)]
        attempts = 3  # torchrun + gloo on this CPU torch sometimes aborts at exit (see tests/test_examples.py)
    errors = []
    for _ in range(attempts):
        run = [str(free_port()) if c == "PORT" else c for c in cmd]
        proc = subprocess.run(run, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
        if proc.returncode == 0:
            return
        errors.append(proc.stdout[-2000:] + proc.stderr[-4000:])
    pytest.fail(f"README.md block at line {chain.line} failed:\n" + "\n\n".join(errors))
