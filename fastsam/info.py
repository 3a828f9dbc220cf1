"""``fastsam info``: versions, devices, and which backends can run here (and why not)."""

from __future__ import annotations

import os
import platform
import sys

import torch


def collect() -> dict:
    from fastsam import ops
    from fastsam.ops import _dispatch
    from fastsam.version import __version__

    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:
        triton_version = f"not installed ({exc.__class__.__name__})"
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    backends = {}
    for name in ops.BACKENDS:
        ok, why = ops.backend_status(name)
        backends[name] = "available" if ok else f"unavailable: {why}"
    probe = {}
    for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        probe[dev] = ops.resolve("perturb", "auto", torch.device(dev), torch.float32)[0]
    from fastsam.ops import _autotune

    return {
        "fastsam": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch cuda": torch.version.cuda or "none (CPU build)",
        "triton": triton_version,
        "triton interpreter": "on" if _dispatch.triton_interpreter_enabled() else "off",
        "devices": devices,
        "backends": backends,
        f"{ops.ENV_VAR}": os.environ.get(ops.ENV_VAR, "(unset)"),
        "auto picks (fp32 perturb)": probe,
        "auto order source (cuda)": _autotune.describe("cuda") if torch.cuda.is_available() else "n/a (no GPU)",
    }


def main(argv=None) -> int:
    info = collect()
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k:<{width - 2}} {v}")
        elif isinstance(value, list):
            print(f"{key:<{width}} {', '.join(value)}")
        else:
            print(f"{key:<{width}} {value}")
    return 0
