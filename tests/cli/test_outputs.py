"""An unwritable output location is one line naming it, exit status 2, before any work, for every command.

We run as root, whom modes do not stop: an unwritable location is one under a regular file, or a folder of
root's that a fit run by another user (a forked child that ``setuid``s to an unused uid) writes into.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from lightning_score.cli import main
from tests.cli.test_behaviour import OWN_CLASSES
from tests.experts import MODEL

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
OTHER_UID = 12345
NOT_A_FOLDER = "is a file, not a folder; choose another location or fix its permissions"


def _fails_with_one_line(args: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("lightning-score")]
    assert exit_info.value.code == 2 and len(lines) == 1, captured.err[-3000:]
    assert "Traceback" not in captured.err
    return lines[0]


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def blocked(tmp_path: Path) -> Path:
    """A regular file: any location under it cannot be written, by root too."""
    path = tmp_path / "a-file"
    path.write_text("not a folder")
    return path


@pytest.mark.parametrize(
    ("options", "what"),
    [
        (["--trainer.callbacks+=lightning_score.ScoreMergeCallback", "--trainer.callbacks.dirpath={blocked}/tvs"],
         "ScoreMergeCallback's dirpath (the task-vector folder) {blocked}/tvs"),
        (["--trainer.default_root_dir={blocked}/run"], "--trainer.default_root_dir {blocked}/run"),
        (["--trainer.logger=CSVLogger", "--trainer.logger.save_dir={blocked}/logs"],
         "The CSVLogger's save_dir (--trainer.logger) {blocked}/logs/lightning_logs"),
        (["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.dirpath={blocked}/checkpoints"],
         "ModelCheckpoint's dirpath {blocked}/checkpoints"),
    ],
    ids=["task-vectors", "default-root-dir", "logger", "checkpoints"],
)  # fmt: skip
def test_fit_names_an_unwritable_output_before_training(
    options: list[str], what: str, blocked: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    args = ["fit", *(a for a in OWN_CLASSES if "logger" not in a and "checkpointing" not in a), "--trainer.max_steps=3",
            f"--trainer.default_root_dir={run}", *(option.format(blocked=blocked) for option in options)]  # fmt: skip
    line = _fails_with_one_line(args, capsys)
    assert line == f"lightning-score: error: {what.format(blocked=blocked)} is not writable: {blocked} {NOT_A_FOLDER}"
    assert not run.exists() or _files(run) == []  # nothing trained, logged or written
    assert blocked.read_text() == "not a folder"


def _as_other_user(args: list[str], folder: Path) -> tuple[int, str]:
    """``main(args)`` in a forked child run by ``OTHER_UID``: its exit status and what it wrote to stderr.

    A fork, not a fresh interpreter: another user may not be able to read the interpreter's own files.
    """
    err = folder / "stderr.txt"
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.setgroups([])
            os.setgid(OTHER_UID)
            os.setuid(OTHER_UID)
            sys.stderr = open(err, "w")  # noqa: SIM115 (closed by the exit)
            try:
                main(args)
                code = 0
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
            sys.stderr.flush()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), err.read_text() if err.exists() else ""


@pytest.mark.skipif(not hasattr(os, "setuid") or os.geteuid() != 0, reason="needs root to act as another user")
def test_a_second_users_fit_into_the_first_users_folder_is_one_line(shared: Path) -> None:
    theirs = shared / "theirs"  # the first user's folder: readable by all, writable by its owner only
    theirs.mkdir()
    theirs.chmod(0o755)
    mine = shared / "mine"
    mine.mkdir()
    os.chown(mine, OTHER_UID, OTHER_UID)
    args = ["fit", *OWN_CLASSES, "--trainer.max_steps=3", f"--trainer.default_root_dir={mine / 'run'}",
            "--trainer.callbacks+=lightning_score.ScoreMergeCallback", f"--trainer.callbacks.dirpath={theirs / 'tvs'}"]  # fmt: skip
    code, err = _as_other_user(args, mine)
    lines = [line for line in err.splitlines() if line.startswith("lightning-score")]
    assert code == 2 and lines == [
        f"lightning-score: error: ScoreMergeCallback's dirpath (the task-vector folder) {theirs / 'tvs'} is not "
        f"writable: cannot create a file in {theirs} (Permission denied); choose another location or fix its "
        "permissions"
    ], err[-3000:]
    assert list(theirs.iterdir()) == [] and not (mine / "run").exists()


def test_merge_names_an_unwritable_output_before_merging(
    quick_base: Path, expert_task_vectors: dict[str, Path], blocked: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    tvs = f"[{expert_task_vectors['rot0']}, {expert_task_vectors['rot30']}]"
    line = _fails_with_one_line(["merge", "--config", str(RECIPES / "digits/merge.yaml"), f"--model.model_name={MODEL}",
                                 f"--model.pretrained={quick_base}", f"--model.task_vectors={tvs}",
                                 "--data.train_domains=[rot0, rot30]", "--data.test_domains=[rot60]",
                                 f"--output={blocked}/merged/score.safetensors", "--trainer.enable_progress_bar=false"],
                                capsys)  # fmt: skip
    assert (
        line
        == f"lightning-score: error: --output {blocked}/merged/score.safetensors is not writable: {blocked} {NOT_A_FOLDER}"
    )


@pytest.mark.parametrize("command", ["test", "validate"])
def test_test_names_an_unwritable_log_folder_before_testing(
    command: str, quick_base: Path, blocked: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    line = _fails_with_one_line([command, "--config", str(RECIPES / "digits/test.yaml"), f"--model.model_name={MODEL}",
                                 f"--model.pretrained={quick_base}", "--data.test_domains=[rot30]",
                                 "--data.train_domains=[rot30]", f"--trainer.default_root_dir={blocked}/run"], capsys)  # fmt: skip
    assert (
        line
        == f"lightning-score: error: --trainer.default_root_dir {blocked}/run is not writable: {blocked} {NOT_A_FOLDER}"
    )


def test_analyze_names_an_unwritable_output_dir_before_the_svds(
    expert_task_vectors: dict[str, Path], blocked: Path, capsys: pytest.CaptureFixture
) -> None:
    paths = ", ".join(str(expert_task_vectors[d]) for d in ("rot0", "rot30"))
    line = _fails_with_one_line(["analyze", f"--task_vectors=[{paths}]", f"--output_dir={blocked}/analysis"], capsys)
    assert line == f"lightning-score: error: --output_dir {blocked}/analysis is not writable: {blocked} {NOT_A_FOLDER}"


def test_study_names_an_unwritable_output_dir_before_any_fit(
    blocked: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    line = _fails_with_one_line(["study", "--config", str(RECIPES / "digits/study.yaml"),
                                 f"--output_dir={blocked}/study"], capsys)  # fmt: skip
    assert line == f"lightning-score: error: --output_dir {blocked}/study is not writable: {blocked} {NOT_A_FOLDER}"
