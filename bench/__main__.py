"""``python -m fastsam.bench``: the same as ``fastsam bench``."""

from .run import main

raise SystemExit(main())
