"""pytest configuration for ``pytest bench/ --benchmark-only`` (not part of the test suite).

On a CPU machine with more runnable processes than cores, time with one torch thread, as
``fastsam bench`` does (``harness.configure_threads``).
"""

import torch


def pytest_configure(config):
    from fastsam.bench import harness

    note = harness.configure_threads("cuda" if torch.cuda.is_available() else "cpu")
    if note:
        print("bench:", note)
