"""Leaves that import nothing of lightning_score: files, profiling, rank decisions, supported strategies.

``files`` (atomic writes, the cache folder, its lock), ``profiling`` (time and peak memory), ``ranks`` (decisions
shared by a Trainer's ranks) and ``strategies`` (what the Lightning layer supports). Like Lightning's own
``lightning.pytorch.utilities``: only for modules every layer may use. A module goes here only if it imports
nothing of lightning_score (``tests/test_architecture.py`` checks it).
"""
