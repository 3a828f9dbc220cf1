"""Thin adapters for other training loops (``fastsam.integrations.<library>``).

Each module imports its library on import; this package imports none of them, so ``import fastsam``
never pulls an integration's dependencies (they are extras: ``pip install 'fastsam[transformers]'``,
``pip install 'fastsam[timm]'``).
"""
