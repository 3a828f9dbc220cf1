"""pytest configuration for ``pytest bench/ --benchmark-only`` (not part of the test suite).

On a CPU machine with more runnable processes than cores, time with one torch thread, as
``fastsam bench`` does (see ``run.py``, note "CPU threads on a busy machine").
"""

import torch


def pytest_configure(config):
    from fastsam.bench import run

    if not torch.cuda.is_available() and torch.get_num_threads() > 1 and run.busy():
        torch.set_num_threads(1)
        print(f"bench: machine busy (load {run.load_average():.1f} on {run.cores()} cores): one torch thread")
