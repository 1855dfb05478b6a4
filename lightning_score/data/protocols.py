"""What the Lightning layer reads from a datamodule besides its loaders, stated once: :class:`SourceDomains`.

:class:`~lightning_score.classifier.CLIPClassifier` (and so :class:`~lightning_score.CLIPExpert` and
:class:`~lightning_score.MergeModule`) builds its zero-shot head from the class names, picks the prompt set and
names its test dataloaders from the domains, and a merge that uses data draws the sources' proxy images.
:class:`~lightning_score.DomainDataModule` provides all of it, and so does the study's ``FoldData``; a datamodule of
your own needs ``classnames`` (or ``classnames=`` on the model), and the rest for what uses it: ``test_domains``
names the test metrics (:class:`TestDomains`), the domain names pick the prompt set (:class:`DomainNames`), the
loaders feed the α search and the data-using merges (:class:`SourceDomains`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

__all__ = ["ClassNames", "DomainNames", "SourceDomains", "TestDomains"]


@runtime_checkable
class ClassNames(Protocol):
    """A datamodule that names its classes: what a zero-shot head needs."""

    @property
    def classnames(self) -> Sequence[str]:
        """Class names in label order (label ``i`` is ``classnames[i]``), as prompts should read them."""
        ...


@runtime_checkable
class TestDomains(Protocol):
    """A datamodule that names its test dataloaders' domains: what the test metrics are named after."""

    @property
    def test_domains(self) -> Sequence[str]:
        """The target domains, in test-dataloader order (``test/<domain>/...`` metric names use them)."""
        ...


@runtime_checkable
class DomainNames(TestDomains, Protocol):
    """A datamodule that names its domains and prompt set: what picks the templates and spots held-out names."""

    @property
    def domains(self) -> Sequence[str]:
        """Every domain of the dataset."""
        ...

    @property
    def train_domains(self) -> Sequence[str]:
        """The source domains (the experts' domains; their held-out data is the validation data)."""
        ...

    @property
    def default_templates(self) -> str | None:
        """The dataset's own prompt-template set (the authors'), if it has one."""
        ...


@runtime_checkable
class SourceDomains(ClassNames, DomainNames, Protocol):
    """A leave-one-domain-out datamodule: classes, domains, the sources' validation data and their proxy images."""

    def val_dataloader(self) -> Any:
        """The source domains' validation data (never a target's)."""
        ...

    def proxy_dataloader(self, domain: str, num_images: int = 32, batch_size: int | None = None) -> Any:
        """Unlabelled images of one SOURCE domain, for the statistics of the merges that use data."""
        ...
