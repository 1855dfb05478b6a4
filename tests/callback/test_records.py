"""callback.records: the selection, the snapshot's verdict, the receipt, the keys and the task vector's provenance."""

from __future__ import annotations

import gc
import os
import pickle
import stat
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lightning_score import ScoreMergeCallback, TaskVector
from lightning_score.callback.records import (
    RESERVED_METADATA,
    Receipt,
    Selection,
    Snapshot,
    check_metadata,
    clean_key,
    compare_with_snapshot,
    expected_fingerprint,
    state_prefix,
    task_vector_metadata,
)
from lightning_score.callback.snapshot import write_snapshot
from lightning_score.task_vector import state_dict_fingerprint
from tests.modules import Regressor, data, trainer


class Tower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        self.head = nn.Linear(4, 2)


# --- keys and prefixes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "clean"),
    [
        ("_orig_mod.proj", "proj"),
        ("head._orig_mod.0.weight", "head.0.weight"),
        ("a._orig_mod.b._orig_mod.c", "a.b.c"),  # nested compiled wrappers
        ("head.0.weight", "head.0.weight"),
        ("my_orig_mod.weight", "my_orig_mod.weight"),  # only a whole `_orig_mod.` component is removed
        ("head._orig_mod", "head._orig_mod"),  # a leaf named so is no wrapper
    ],
)
def test_clean_key_removes_only_the_compile_wrappers_component(key: str, clean: str) -> None:
    assert clean_key(key) == clean


def test_state_prefix_finds_the_submodule_by_identity_compiled_or_not() -> None:
    tower = Tower()
    assert state_prefix(tower, tower) == ""
    assert state_prefix(tower, tower.encoder) == "encoder"
    assert state_prefix(tower, tower.encoder[1]) == "encoder.1"
    head = tower.head
    tower.head = torch.compile(head, backend="eager")  # state-dict keys gain `head._orig_mod.`
    assert any(k.startswith("head._orig_mod.") for k in tower.state_dict())
    assert state_prefix(tower, head) == "head"  # the wrapped module
    assert state_prefix(tower, tower.head) == "head"  # the wrapper
    with pytest.raises(ValueError, match="The selected Linear is not a submodule of Tower"):
        state_prefix(tower, nn.Linear(1, 1))


def test_expected_fingerprint_is_the_modules_record_of_its_image_encoder_only() -> None:
    module = Regressor(encoder_attr=True)
    assert expected_fingerprint(module, module.head) == state_dict_fingerprint(module.head.state_dict())
    assert expected_fingerprint(module, module.backbone) is None  # another submodule: the record does not say
    assert expected_fingerprint(Regressor(), Regressor().head) is None  # no record
    module.pretrained_fingerprint = None
    assert expected_fingerprint(module, module.head) is None


# --- Selection -------------------------------------------------------------------------------------------------------


def test_selection_defaults_to_the_floating_point_entries_and_reads_the_live_tensors() -> None:
    tower = Tower()
    selection = Selection.of(tower, tower.encoder)
    assert selection.prefix == "encoder"
    assert selection.keys == ("0.bias", "0.weight", "1.bias", "1.running_mean", "1.running_var", "1.weight")
    assert selection.raw_keys == selection.keys
    live = selection.live_state()
    assert list(live) == list(selection.keys)
    assert live["0.weight"] is tower.encoder[0].weight  # the parameter itself, not a copy
    with torch.no_grad():
        tower.encoder[0].weight.add_(1.0)
    assert torch.equal(selection.live_state()["0.weight"], tower.encoder[0].weight)
    tower.to(torch.float64)  # buffers are replaced by new tensors: they are read again, not kept
    assert selection.live_state()["1.running_mean"] is tower.encoder[1].running_mean
    assert selection.live_state()["1.running_mean"].dtype == torch.float64
    with pytest.raises(AttributeError):
        selection.prefix = "other"  # frozen: kept from setup as it was made


def test_selection_of_given_keys_checks_them() -> None:
    tower = Tower()
    selection = Selection.of(tower, tower, ["head.weight", "encoder.0.bias"])
    assert selection.keys == ("encoder.0.bias", "head.weight")  # sorted
    with pytest.raises(ValueError, match="select_module chose 'head.gamma', which Tower does not have"):
        Selection.of(tower, tower, ["head.gamma"])
    with pytest.raises(ValueError, match="chose 'encoder.1.num_batches_tracked', which is not floating point"):
        Selection.of(tower, tower, ["encoder.1.num_batches_tracked"])
    with pytest.raises(ValueError, match=r"selected for the task vector \(ReLU\) has no floating-point weights"):
        relu = nn.ReLU()
        Selection.of(nn.Sequential(relu), relu)


def test_selection_keys_are_clean_and_follow_a_compile_done_after_it() -> None:
    tower = Tower()
    tower.head = torch.compile(tower.head, backend="eager")
    compiled = Selection.of(tower, tower, ["head._orig_mod.weight"])
    assert compiled.keys == ("head.weight",) and compiled.raw_keys == ("head._orig_mod.weight",)
    assert compiled.live_state()["head.weight"] is tower.head.weight
    plain = Tower()
    selection = Selection.of(plain, plain)
    plain.encoder = torch.compile(plain.encoder, backend="eager")  # after the selection was made
    live = selection.live_state()
    assert list(live) == list(selection.keys) and live["encoder.0.weight"] is plain.encoder._orig_mod[0].weight


def test_selection_says_when_an_entry_is_gone_and_whether_its_submodule_still_belongs() -> None:
    tower = Tower()
    selection = Selection.of(tower, tower)
    assert selection.belongs_to(tower)
    tower.head = nn.Linear(4, 2, bias=False)  # replaced (as configure_model may do): `head.bias` is gone
    with pytest.raises(RuntimeError, match=r"keys changed during fitting \(Tower no longer has e.g. \['head.bias'\]"):
        selection.live_state()
    head = Selection.of(tower, tower.head)
    tower.head = nn.Linear(4, 2)
    assert not head.belongs_to(tower) and selection.belongs_to(tower)


# --- the snapshot's verdict ------------------------------------------------------------------------------------------


def _snapshot(state: dict[str, torch.Tensor], folder: Path) -> Snapshot:
    path, fingerprint = write_snapshot(state, folder)
    return Snapshot("", path, fingerprint)


def test_compare_with_snapshot_gives_one_of_three_verdicts(tmp_path: Path) -> None:
    state = {"w": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([0.5])}
    snapshot = _snapshot(state, tmp_path)
    assert compare_with_snapshot(snapshot, {k: v.clone() for k, v in state.items()}) == "same"
    assert compare_with_snapshot(snapshot, {k: v.to(torch.bfloat16) for k, v in state.items()}) == "same"  # exact
    assert compare_with_snapshot(snapshot, {**state, "w": torch.tensor([1.0, 2.0, 4.0])}) == "changed"
    converted = {k: v.to(torch.bfloat16) for k, v in state.items()}
    assert compare_with_snapshot(snapshot, {**converted, "b": torch.tensor([0.75], dtype=torch.bfloat16)}) == (
        "changed and converted"
    )
    fine = {"w": torch.tensor([1.0 + 2**-12, 2.0, 3.0]), "b": torch.tensor([0.5])}  # lost in bfloat16
    assert compare_with_snapshot(_snapshot(fine, tmp_path), {k: v.to(torch.bfloat16) for k, v in fine.items()}) == (
        "same"  # up to the precision conversion: the converted snapshot is what the module holds
    )


# --- Receipt ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def temporary_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The temporary directory (``tempfile.gettempdir()``) moved to a fresh folder of this test."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_receipt_writes_reads_and_forgets(temporary_folder: Path) -> None:
    receipt, other = Receipt("test-records-a"), Receipt("test-records-b")
    receipt.forget()  # nothing there: no error
    assert receipt.read() is None and receipt.path != other.path
    outputs = {"task_vector": "a.safetensors", "merged": None}
    receipt.write(outputs)
    assert pickle.loads(pickle.dumps(receipt)).read() == outputs and other.read() is None  # a worker finds it
    receipt.path.write_text("{ half written")
    assert receipt.read() is None  # unreadable is no receipt
    receipt.forget()
    assert not receipt.path.exists() and receipt.read() is None


def test_receipts_are_kept_in_a_folder_private_to_the_user(temporary_folder: Path) -> None:
    receipt = Receipt("private")
    receipt.write({"task_vector": "a.safetensors"})
    folder = receipt.path.parent
    assert folder == temporary_folder / f"lightning-score-{os.getuid()}"
    info = os.lstat(folder)
    assert stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) == 0o700
    os.chmod(folder, 0o755)  # made wider by hand (or by an earlier version): narrowed again when next used
    Receipt("again").write({})
    assert stat.S_IMODE(os.lstat(folder).st_mode) == 0o700


@pytest.mark.parametrize("intruder", ["another user's folder", "a symbolic link"])
def test_a_receipt_folder_of_another_user_or_a_link_is_left_alone(intruder: str, temporary_folder: Path) -> None:
    shared = temporary_folder / f"lightning-score-{os.getuid()}"
    target = temporary_folder / "elsewhere"
    target.mkdir()
    os.chown(target, 12345, 12345)  # a second user on the machine, whose folder is open to all (0755)
    os.chmod(target, 0o755)
    if intruder == "a symbolic link":
        shared.symlink_to(target)
    else:
        target.rename(shared)
        target = shared
    receipt, outputs = Receipt("guarded"), {"task_vector": "a.safetensors", "merged": "m.safetensors"}
    problem = "is a symbolic link" if intruder == "a symbolic link" else r"belongs to another user \(uid 12345\)"
    with pytest.warns(UserWarning, match=f"receipt folder '{shared}' is not used: it {problem}"):
        receipt.write(outputs)
    assert os.listdir(target) == []  # nothing written into, or read from, the other user's folder
    own = receipt.path.parent
    assert own == temporary_folder / f"lightning-score-{os.getuid()}-guarded"
    assert os.lstat(own).st_uid == os.getuid() and stat.S_IMODE(os.lstat(own).st_mode) == 0o700
    assert pickle.loads(pickle.dumps(receipt)).read() == outputs  # a spawned worker finds it there too
    assert receipt.read() == outputs and not own.exists()  # read by its owner: removed, with its folder
    assert os.lstat(target).st_uid == 12345 and os.listdir(target) == []


def test_a_receipt_is_removed_once_its_owner_read_it_and_when_its_callback_goes(temporary_folder: Path) -> None:
    receipt, outputs = Receipt("read-once"), {"task_vector": "a.safetensors"}
    receipt.write(outputs)
    worker = pickle.loads(pickle.dumps(receipt))  # what a spawned worker holds
    assert worker.read() == outputs and receipt.path.exists()  # a worker reads without removing
    assert receipt.read() == outputs and not receipt.path.exists()  # the process that made it removes it
    assert receipt.read() == outputs  # and still knows what it read
    worker.forget()  # a new fit starts in a worker: the main process must not keep the old outputs
    assert receipt.read() is None and not receipt.path.exists()
    unread = Receipt("never-read")
    unread.write(outputs)
    path = unread.path
    assert path.exists()
    del unread, receipt, worker
    gc.collect()
    assert os.listdir(temporary_folder / f"lightning-score-{os.getuid()}") == []  # nothing piles up


def test_a_receipt_that_cannot_be_written_is_a_warning_not_a_failed_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    in_the_way = tmp_path / "not-a-folder"
    in_the_way.write_text("a file where the temporary folder should be")
    monkeypatch.setattr(tempfile, "tempdir", str(in_the_way))
    callback = ScoreMergeCallback(dirpath=tmp_path / "tv", name="reg")
    with pytest.warns(UserWarning, match="could not write the receipt of this fit .*written all the same"):
        trainer(tmp_path, [callback]).fit(Regressor(), data())
    assert callback.task_vector_path == tmp_path / "tv" / "reg.safetensors"
    assert TaskVector.load(callback.task_vector_path).metadata["global_step"] == 6


# --- provenance ------------------------------------------------------------------------------------------------------


def _fit(global_step: int = 6, train_domains: list[str] | None = None) -> SimpleNamespace:
    datamodule = SimpleNamespace(train_domains=train_domains) if train_domains is not None else None
    return SimpleNamespace(datamodule=datamodule, global_step=global_step, precision="bf16-mixed")


def test_task_vector_metadata_records_the_fit() -> None:
    expert = Regressor()
    expert.base_model = "tiny/digits"
    meta = task_vector_metadata(_fit(train_domains=["rot15"]), expert, None, None, "clip.visual")
    assert meta == {"name": "rot15", "module": "clip.visual", "domain": "rot15", "train_domains": ["rot15"],
                    "base_model": "tiny/digits", "global_step": 6, "precision": "bf16-mixed"}  # fmt: skip
    several = task_vector_metadata(_fit(train_domains=["a", "b"]), Regressor(), None, None, "")
    assert several == {"name": "Regressor", "module": "<trainable parameters>", "train_domains": ["a", "b"],
                       "global_step": 6, "precision": "bf16-mixed"}  # fmt: skip
    named = task_vector_metadata(_fit(), Regressor(), "mine", "sketch", "head")
    assert (named["name"], named["domain"]) == ("mine", "sketch") and "train_domains" not in named


def test_task_vector_metadata_adds_extra_fields_that_cannot_replace_its_own() -> None:
    meta = task_vector_metadata(_fit(3), Regressor(), "x", None, "head", {"seed": 1, "name": "spoof", "step": [1]})
    assert meta["seed"] == 1 and meta["step"] == [1]
    assert meta["name"] == "x" and meta["global_step"] == 3
    assert task_vector_metadata(_fit(3), Regressor(), "x", None, "head", None) == task_vector_metadata(
        _fit(3), Regressor(), "x", None, "head"
    )


def test_check_metadata_refuses_what_the_callback_records_and_what_json_cannot_hold() -> None:
    given = {"expert_config": {"lr": 0.1}}
    checked = check_metadata(given)
    assert checked == given and checked is not given and check_metadata(None) == {}
    for name in sorted(RESERVED_METADATA):
        with pytest.raises(ValueError, match=rf"\['{name}'\] are recorded by the callback itself"):
            ScoreMergeCallback(metadata={name: "x"})
    with pytest.raises(ValueError, match=r"\['keys', 'pretrained'\] are argument names of TaskVector.from_state"):
        ScoreMergeCallback(metadata={"keys": 1, "pretrained": 2})
    with pytest.raises(ValueError, match="must be JSON-serialisable: Object of type .*Path"):
        ScoreMergeCallback(metadata={"where": Path("x")})


def test_a_fit_records_the_given_metadata_with_its_own(tmp_path: Path) -> None:
    extra = {"expert_config": {"lr": 0.1, "steps": 6}, "seed": 0}
    callback = ScoreMergeCallback(dirpath=tmp_path, name="reg", metadata=extra)
    extra["seed"] = 99  # the callback keeps its own copy
    trainer(tmp_path, [callback]).fit(Regressor(), data())
    tv = TaskVector.load(callback.task_vector_path)
    assert tv.metadata["expert_config"] == {"lr": 0.1, "steps": 6} and tv.metadata["seed"] == 0
    assert tv.name == "reg" and tv.metadata["global_step"] == 6 and tv.base_fingerprint.startswith("blake2b:")
