"""The ``fastsam`` command line (also ``python -m fastsam``).

    fastsam info     versions, devices, available backends and why others are not
    fastsam train    the built-in main job: SGD vs SAM vs ASAM on noisy digits
    fastsam bench    benchmarks against the baseline and peers (``fastsam bench --help``)
    fastsam sharpness DIR   m-sharpness, Hessian lambda_max/trace, loss landscape of fastsam train --save DIR
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="fastsam", description="Sharpness-Aware Minimization with fused kernels")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("info", help="versions, devices and available backends")
    from fastsam import train

    train.build_parser(sub.add_parser("train", help="train SGD/SAM/ASAM on noisy digits (built-in data)",
                                      description=train.__doc__))
    sub.add_parser("bench", help="benchmarks against the per-parameter baseline and peers", add_help=False)
    from fastsam.sharpness import cli as sharpness_cli

    sharpness_cli.build_parser(sub.add_parser("sharpness", help="flatness of the models fastsam train --save kept",
                                              description=sharpness_cli.__doc__))
    if argv[:1] == ["bench"]:  # the benchmark driver owns its options (and its --help)
        from fastsam.bench import run

        return run.main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "info":
        from fastsam import info

        return info.main()
    if args.command == "train":
        return train.main(argv[1:])
    if args.command == "sharpness":
        return sharpness_cli.main(argv[1:])
    parser.print_help()
    return 2
