"""Atomic writes and published folders: a reader sees a whole file or folder, or none; a racing loser is discarded."""

from __future__ import annotations

from pathlib import Path

from lightning_score.utilities.files import atomic_publish_dir


def test_a_folder_published_by_a_racing_process_wins(tmp_path: Path) -> None:
    final = tmp_path / "artefact"

    def build(scratch: Path) -> None:
        (scratch / "mine.txt").write_text("loser")
        final.mkdir()  # another process finishes first
        (final / "theirs.txt").write_text("winner")

    assert atomic_publish_dir(final, build) == final
    assert [p.name for p in final.iterdir()] == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["artefact"]  # the losing copy is removed
