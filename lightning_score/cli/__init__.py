"""The ``lightning-score`` command (``lightning_score.cli:main``): LightningCLI plus ``merge``, ``analyze``, ``study``.

* :mod:`.command`: :class:`LightningScoreCLI`, :class:`SaveRunConfig` and :func:`main`;
* :mod:`.trainer`: :class:`ScoreTrainer` (Lightning's Trainer plus ``merge``);
* :mod:`.analyze`: ``lightning-score analyze``; :mod:`.errors`, :mod:`.help`, :mod:`.console`: what it prints.
"""

from lightning_score.cli.command import LightningScoreCLI, SaveRunConfig, main
from lightning_score.cli.trainer import ScoreTrainer

__all__ = ["LightningScoreCLI", "SaveRunConfig", "ScoreTrainer", "main"]
