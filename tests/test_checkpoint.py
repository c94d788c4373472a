"""Checkpoint files: atomic writes, and loading never executes code."""

import os

import pytest
import torch

from mimkit.checkpoint import CheckpointError, atomic_write_text, list_checkpoints, load_checkpoint, save_checkpoint


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_runs_code_when_unpickled_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    Exploit.marker = marker
    path = tmp_path / "checkpoint-00000001.pt"
    torch.save({"model": {}, "payload": Exploit()}, path)
    with pytest.raises(CheckpointError, match=r"checkpoint-00000001.pt: refused .*(posix|os)\.system"):
        load_checkpoint(path)
    assert not marker.exists()


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "checkpoint-00000002.pt"
    save_checkpoint(path, {"step": 2, "w": torch.ones(3)})

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(path, {"step": 3, "bad": Boom()})
    assert load_checkpoint(path)["step"] == 2  # the previous file is untouched
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind


def test_list_checkpoints_orders_by_step_and_ignores_others(tmp_path):
    for step in (10, 2, 100):
        save_checkpoint(tmp_path / f"checkpoint-{step:08d}.pt", {"step": step})
    (tmp_path / "checkpoint-latest.pt").write_text("x")
    atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "checkpoint-00000002.pt", "checkpoint-00000010.pt", "checkpoint-00000100.pt"]  # fmt: skip
    assert list_checkpoints(tmp_path / "missing") == []
