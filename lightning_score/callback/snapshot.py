"""The pre-trained weights θ₀ a task vector is measured from, kept once on disk.

:class:`~lightning_score.ScoreMergeCallback` writes θ₀ when fitting starts to
``<task-vector folder>/pretrained/<fingerprint>.safetensors`` (atomically, by rank zero only), so no
process keeps a copy in memory during training and a checkpoint carries only the file's path and
fingerprint. Experts fine-tuned from the same base share one file: its name is the content's fingerprint
(:func:`~lightning_score.task_vector.state_dict_fingerprint`), and a file already there is not written again.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor

from lightning_score.utilities.files import atomic_write
from lightning_score.utilities.tensor_files import (
    FORMAT_KEY,
    VERSION_KEY,
    FileKind,
    LazySafetensors,
    read_header,
    state_dict_fingerprint,
)

__all__ = ["SNAPSHOT_FORMAT", "SNAPSHOT_KIND", "read_snapshot", "snapshot_fingerprint", "write_snapshot"]

SNAPSHOT_FORMAT = "lightning-score/pretrained-snapshot"

SNAPSHOT_KIND = FileKind(
    format=SNAPSHOT_FORMAT,
    version=1,
    what="pre-trained snapshot",
    when_missing="ScoreMergeCallback writes it beside the task vectors when fitting starts and a resumed fit reads it "
    "back: restore the file (or the whole task-vector folder), or start the fit afresh without ckpt_path.",
    when_unreadable="it cannot serve as θ₀: start the fit afresh without ckpt_path.",
    make="It cannot serve as θ₀: start the fit afresh without ckpt_path, and ScoreMergeCallback writes a new one.",
)


def _header(path: Path) -> dict[str, str]:
    return read_header(path, SNAPSHOT_KIND)


def snapshot_fingerprint(path: str | os.PathLike[str]) -> str:
    """The fingerprint recorded in a snapshot file's header (cheap: the tensors are not read)."""
    return _header(Path(path))["fingerprint"]


def write_snapshot(state: Mapping[str, Tensor], folder: str | os.PathLike[str]) -> tuple[Path, str]:
    """Write θ₀ as ``<folder>/pretrained/<fingerprint>.safetensors``, unless that file already holds it.

    A file already there (written by an earlier fit from the same base) is reused only once its content hashes to
    ``state``'s fingerprint (every byte is read); a damaged one, or one in the way that is not a snapshot, is written
    again from ``state``, with a warning naming it.

    Args:
        state: The weights (any device and dtype; written as they are).
        folder: The task vectors' folder.

    Returns:
        The file and the fingerprint of ``state``.
    """
    fingerprint = state_dict_fingerprint(state, list(state))
    path = Path(folder) / "pretrained" / f"{fingerprint.replace(':', '-')}.safetensors"
    if path.exists():
        try:
            read_snapshot(path, fingerprint, verify=True)
            return path, fingerprint  # written by an earlier fit from the same base, and intact
        except (OSError, ValueError, SafetensorError) as error:
            warnings.warn(
                f"ScoreMergeCallback: the pre-trained snapshot '{path}' cannot be reused ({error}); it is written "
                "again from the module's weights. Task vectors measured from it while it was damaged are wrong: "
                "refit them.",
                stacklevel=2,
            )
    tensors: dict[str, Tensor] = {}
    storages: set[int] = set()
    for key, value in state.items():
        tensor = value.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in storages:
            tensor = tensor.clone()  # safetensors refuses tensors that share memory (tied weights)
        storages.add(tensor.untyped_storage().data_ptr())
        tensors[key] = tensor
    header = {FORMAT_KEY: SNAPSHOT_FORMAT, VERSION_KEY: str(SNAPSHOT_KIND.version), "fingerprint": fingerprint}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))
    return path, fingerprint


def read_snapshot(
    path: str | os.PathLike[str], fingerprint: str | None = None, verify: bool = False
) -> Mapping[str, Tensor]:
    """Read θ₀ back lazily: a tensor is read from the file when it is indexed, so θ₀ is never all in memory.

    Args:
        path: The snapshot file.
        fingerprint: The fingerprint it must record (e.g. the one a checkpoint kept).
        verify: Also hash the content and compare (every byte is read).

    Raises:
        FileNotFoundError: The file is gone.
        ValueError: It is not a snapshot, or not the one expected.
    """
    path = Path(path)
    recorded = _header(path)["fingerprint"]
    if fingerprint is not None and recorded != fingerprint:
        raise ValueError(
            f"The pre-trained snapshot '{path}' holds other weights ({recorded[:20]}…) than expected "
            f"({fingerprint[:20]}…): it was replaced since the checkpoint was written."
        )
    state = LazySafetensors(path)
    if verify and state_dict_fingerprint(state, list(state)) != recorded:
        raise ValueError(
            f"The pre-trained snapshot '{path}' is damaged: its content no longer matches its fingerprint."
        )
    return state
