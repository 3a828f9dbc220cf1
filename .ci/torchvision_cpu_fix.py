"""Make PyPI's torchvision importable beside a CPU-only build of torch (CI's machine), if needed.

Why: the only torchvision release for torch 2.13 is 0.28.0 (its METADATA requires torch==2.13.0).
PyPI's x86_64 wheel of it is built against the CUDA build of torch: beside the CPU build its C++
ops library (torchvision/_C.so) does not load (it links libtorch_cuda.so), which torchvision
tolerates everywhere except in two unguarded fake-kernel registrations (``torchvision::nms``, ``qnms``) in
``torchvision/_meta_registrations.py``, so ``import torchvision`` dies with "operator
torchvision::nms does not exist" -- and with it every package that imports torchvision when it is
installed: timm, transformers, torchmetrics, Lightning.

What: ``python .ci/torchvision_cpu_fix.py`` checks ``import torchvision`` in a fresh interpreter.
Only when it fails that way does it install a start-up hook (a ``.pth`` file and one module in
site-packages) that, just before ``torchvision._meta_registrations`` runs and only if torchvision's
own ops did not load, declares those two operators' schemas, as torchvision's C++ library would have.
torchvision's models and transforms then import; its compiled ops (``torchvision.ops.nms``,
``roi_align``, ...) still raise torchvision's own "Couldn't load custom C++ ops" error. With a
matching torchvision (e.g. a CPU wheel beside a CPU torch) nothing is installed. ``--remove`` undoes it.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

MODULE = "_fastsam_torchvision_cpu_fix"
HOOK = '''"""Installed by fastsam's .ci/torchvision_cpu_fix.py: see that file for why."""
import importlib.abc
import sys


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision._meta_registrations":
            return None
        sys.meta_path.remove(self)
        try:
            import torch
            import torchvision.extension

            if not torchvision.extension._has_ops():
                global _LIB
                _LIB = torch.library.Library("torchvision", "FRAGMENT")
                for op in ("nms", "qnms"):  # the unguarded registrations in torchvision 0.28
                    _LIB.define(op + "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        except Exception:
            pass
        return None


sys.meta_path.insert(0, _Finder())
'''
CHECK = "import torchvision, sys; print(torchvision.__version__)"


def site_dir() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def importable() -> tuple[bool, str]:
    proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=300)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return proc.returncode == 0, lines[-1] if lines else ""


def main(argv: list[str]) -> int:
    pth, module = site_dir() / f"{MODULE}.pth", site_dir() / f"{MODULE}.py"
    if "--remove" in argv:
        for f in (pth, module):
            f.unlink(missing_ok=True)
        print("torchvision CPU fix removed")
        return 0
    ok, last = importable()
    if ok:
        print(f"torchvision {last} imports as it is: no fix needed")
        return 0
    if not ("operator torchvision::" in last and "does not exist" in last):
        print(f"torchvision does not import, for another reason than this fix handles: {last}", file=sys.stderr)
        return 1
    module.write_text(HOOK)
    pth.write_text(f"import {MODULE}\n")
    ok, last = importable()
    if not ok:
        print(f"torchvision still does not import after the fix: {last}", file=sys.stderr)
        return 1
    print(f"torchvision {last}: its C++ ops do not load beside this torch ({sys.executable}); installed the "
          f"import fix {pth} (torchvision.ops' compiled ops stay unavailable)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
