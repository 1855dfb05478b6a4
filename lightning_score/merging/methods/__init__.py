"""The merge methods, one file per family; importing this package registers every method, in this order.

The order is the order of :func:`~lightning_score.merging.list_methods`: the SCORE paper's methods first (SCORE,
TSV-M, Iso-C/Iso-CTS, TIES, MagMax, PCB, Task Arithmetic and averaging, ESM), then the further baselines. A new
method is one file here and one import line below (see ``docs/adding-a-method.md``).
"""

# importing a method module registers it; the order is the order of list_methods()
from lightning_score.merging.methods import score, tsv, iso, ties, magmax, pcb, arithmetic, esm  # noqa: F401  # isort: skip
from lightning_score.merging.methods import dare, breadcrumbs, randmix, model_stock, cart, wudi, regmean, fisher, knots  # noqa: F401  # isort: skip
