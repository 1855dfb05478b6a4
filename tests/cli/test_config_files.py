"""Config files as the command reads them: a YAML tag is refused in one line naming the tag, the file and the line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lightning_score.cli import main
from tests.processes import worker_environment

TAGGED = """\
seed_everything: 0
trainer:
  accelerator: cpu
  max_steps: !!python/object/apply:os.system ["touch {marker}"]
"""


def test_a_python_tag_in_a_config_names_the_file_and_line_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    config = tmp_path / "tagged.yaml"
    config.write_text(TAGGED.format(marker=marker))
    result = subprocess.run([sys.executable, "-m", "lightning_score.cli", "fit", "--config", str(config)],
                            env=worker_environment(), capture_output=True, text=True, timeout=300)  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0] == (
        f"lightning-score: error: {config}, line 4, column 14: the YAML tag '!!python/object/apply:os.system' is "
        "not allowed in a config (tags that build Python objects are never loaded); write the plain value "
        "instead, and a class as class_path: ... with init_args: ..."
    )
    assert not marker.exists()


@pytest.mark.parametrize("command", ["fit", "study"])
def test_a_tag_in_a_nested_config_names_that_file(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "trainer.yaml").write_text("accelerator: cpu\n\nmax_steps: !custom 3\n")
    (folder / "main.yaml").write_text(
        "trainer: trainer.yaml\n" if command == "fit" else "seeds: !!python/name:os.getcwd\n"
    )
    monkeypatch.chdir(tmp_path)  # trainer.yaml is relative to main.yaml's folder, not to the working folder
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--config", "configs/main.yaml"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1, lines
    if command == "fit":
        expected = f"{(folder / 'trainer.yaml').resolve()}, line 3, column 12: the YAML tag '!custom' is not allowed"
    else:
        expected = "configs/main.yaml, line 1, column 8: the YAML tag '!!python/name:os.getcwd' is not allowed"
    assert lines[0].startswith(f"lightning-score: error: {expected}"), lines[0]


def test_a_plain_config_still_loads_as_before(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "plain.yaml"
    config.write_text("trainer:\n  max_steps: 7\n  accelerator: !!str cpu\n")  # standard tags stay allowed
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "max_steps: 7" in out and "accelerator: cpu" in out
