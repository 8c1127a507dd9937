"""antspyx set up the same way by every stage: ITK's thread count and a fixed seed for ANTs' metric sampling.

The affine and rigid stages of ``ants.registration`` sample a random subset of voxels for the metric; unseeded,
the same real T1w registered well on one run and failed on the next (MNI correlation 0.58 vs 0.25). antspyx
reads the seed only from ``ants.config`` (a ``random_seed=`` argument to ``ants.registration`` is swallowed by
its ``**kwargs``), and ``ants.set_ants_deterministic`` would also force one thread, so the seed is set here.
Results still depend on the thread count (ITK splits the sums across threads).
"""
from __future__ import annotations

import os

RANDOM_SEED = 20261202


def load_ants(threads: int | None = None):
    """The ``ants`` module, seeded; with ``threads``, ITK's thread count is set first (it is read at import)."""
    if threads:
        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(int(threads))
    import ants

    ants.config._random_seed = RANDOM_SEED
    return ants
