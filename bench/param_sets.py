"""Parameter-set shapes the benchmarks use (shapes only; no model code needed).

* ``resnet18``   - CIFAR-style ResNet-18: 62 tensors, 11.17M values
* ``vit_b``      - ViT-B/16 at 224px: 152 tensors, about 86M values
* ``small2000``  - 2000 tensors of 500 values (1M): launch-bound, where per-tensor loops hurt most
* ``huge``       - 1.07B values in 8 tensors (GPU only)
* ``tiny``       - 10 tensors, 11k values, odd sizes: for smoke tests of the benchmark code
"""

from __future__ import annotations

import math


def resnet18_shapes(num_classes: int = 10) -> list[tuple[int, ...]]:
    shapes = [(64, 3, 3, 3), (64,), (64,)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            s = stride if block == 0 else 1
            shapes += [(cout, cin, 3, 3), (cout,), (cout,), (cout, cout, 3, 3), (cout,), (cout,)]
            if s != 1 or cin != cout:
                shapes += [(cout, cin, 1, 1), (cout,), (cout,)]
            cin = cout
    shapes += [(num_classes, 512), (num_classes,)]
    return shapes


def vit_b_shapes(num_classes: int = 1000, depth: int = 12, dim: int = 768, mlp: int = 3072,
                 patch: int = 16, tokens: int = 197) -> list[tuple[int, ...]]:
    shapes = [(dim, 3, patch, patch), (dim,), (1, 1, dim), (1, tokens, dim)]
    for _ in range(depth):
        shapes += [(dim,), (dim,), (3 * dim, dim), (3 * dim,), (dim, dim), (dim,),
                   (dim,), (dim,), (mlp, dim), (mlp,), (dim, mlp), (dim,)]
    shapes += [(dim,), (dim,), (num_classes, dim), (num_classes,)]
    return shapes


def small_shapes(n: int = 2000, size: int = 500) -> list[tuple[int, ...]]:
    return [(size,)] * n


def huge_shapes(total: int = 2 ** 30, pieces: int = 8) -> list[tuple[int, ...]]:
    return [(total // pieces,)] * pieces


def tiny_shapes() -> list[tuple[int, ...]]:
    return [(16, 3, 3, 3), (16,), (32, 16, 3, 3), (32,), (10, 32), (10,), (7,), (1,), (33, 5), (4097,)]


PARAM_SETS = {
    "resnet18": resnet18_shapes,
    "vit_b": vit_b_shapes,
    "small2000": small_shapes,
    "huge": huge_shapes,
    "tiny": tiny_shapes,
}


def numel(shapes) -> int:
    return sum(math.prod(s) for s in shapes)
