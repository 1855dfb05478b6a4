"""An optional dependency that is not installed fails in one line naming the extra that installs it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lightning_score.utilities.extras import MissingExtraError, require


def test_require_returns_the_installed_module() -> None:
    assert require("json", extra="none") is sys.modules["json"]


def test_a_missing_module_names_its_extra_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # what Python does for a module that is not installed
    with pytest.raises(MissingExtraError) as caught:
        require("transformers", extra="hf")
    message = str(caught.value)
    assert message == "transformers is not installed: install the hf extra: pip install 'lightning-score[hf]'"
    assert isinstance(caught.value, ImportError)


def test_a_module_whose_own_dependency_is_missing_reports_that_dependency(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "half_installed_library.py").write_text("import a_dependency_nobody_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as caught:
        require("half_installed_library", extra="hf")
    assert not isinstance(caught.value, MissingExtraError)
    assert caught.value.name == "a_dependency_nobody_installed"
