"""Checkpoint files: atomic layout, pruning, temp cleanup, resume discovery, compatibility errors, RNG."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from dist_train import checkpoint as ckpt_io
from dist_train.models import build_model, unwrap


def state(step: int, model: torch.nn.Module, classes=("a", "b"), **config) -> dict:
    return {"format_version": ckpt_io.FORMAT_VERSION, "model": model.state_dict(), "optimizer": {}, "epoch": 0,
            "step": step, "config": {"model": "cnn_rnn", "hidden_size": 8, "rnn": "lstm", "rnn_layers": 1,
                                     "bidirectional": False, "head": "last", **config}, "classes": list(classes)}


@pytest.fixture(scope="module")
def model():
    return build_model("cnn_rnn", 2, hidden=8)


def test_save_last_links_prunes_and_loads_weights_only(tmp_path, model):
    for step in (1, 2, 3, 4):
        ckpt_io.save_last(state(step, model), tmp_path, keep_last=2)
    kept = sorted(p.name for p in (tmp_path / ckpt_io.STEP_DIR).iterdir())
    assert kept == ["step-00000003.pt", "step-00000004.pt"]
    last = ckpt_io.load_checkpoint(tmp_path / ckpt_io.LAST)  # weights_only=True inside
    assert last["step"] == 4 and last["kind"] == "last"
    assert torch.load(tmp_path / ckpt_io.LAST, weights_only=True)["step"] == 4
    assert not list(tmp_path.rglob("*.tmp"))


def test_find_resume_passes_over_damaged_files_and_tmp_is_cleaned(tmp_path, model):
    ckpt_io.save_last(state(5, model), tmp_path, keep_last=3)
    newest = ckpt_io.step_path(tmp_path, 9)
    newest.write_bytes(b"half a checkpoint")  # e.g. copied by hand and cut off
    (tmp_path / "last.pt.tmp").write_bytes(b"partial")
    (tmp_path / ckpt_io.STEP_DIR / "step-00000010.pt.tmp").write_bytes(b"partial")
    (tmp_path / "best.pt.node7-4242.tmp").write_bytes(b"partial")  # a writer's own temp name
    removed = ckpt_io.clean_tmp(tmp_path)
    assert len(removed) == 3 and not list(tmp_path.rglob("*.tmp"))
    path, problems = ckpt_io.find_resume(tmp_path)
    assert path == ckpt_io.step_path(tmp_path, 5)
    assert len(problems) == 1 and "step-00000009.pt" in problems[0]
    assert ckpt_io.find_resume(tmp_path / "empty") == (None, [])


def test_load_rejects_foreign_files(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a loadable checkpoint"):
        ckpt_io.load_checkpoint(tmp_path / "x.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "y.pt")
    with pytest.raises(ValueError, match="not a dist_train checkpoint"):
        ckpt_io.load_checkpoint(tmp_path / "y.pt")


def test_mismatch_errors_say_what_differs(model):
    ck = state(1, model)
    ckpt_io.check_compatible(ck, ck["config"], ["a", "b"], model, "ck")  # same: fine
    with pytest.raises(ckpt_io.CheckpointMismatch, match=r"class list.*\['a', 'b'\].*\['a', 'c'\]"):
        ckpt_io.check_compatible(ck, ck["config"], ["a", "c"], model, "ck")
    bigger = build_model("cnn_rnn", 2, hidden=16)
    with pytest.raises(ckpt_io.CheckpointMismatch, match=r"hidden_size: checkpoint 8, this run 16(.|\n)*shapes"):
        ckpt_io.check_compatible(ck, {**ck["config"], "hidden_size": 16}, ["a", "b"], bigger, "ck")
    other = build_model("r3d_18", 2)
    with pytest.raises(ckpt_io.CheckpointMismatch, match="model: checkpoint 'cnn_rnn', this run 'r3d_18'"):
        ckpt_io.check_compatible(ck, {**ck["config"], "model": "r3d_18"}, ["a", "b"], other, "ck")


def test_rng_state_round_trip_through_weights_only(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    saved = ckpt_io.rng_state()
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    torch.save({"rng": saved}, tmp_path / "r.pt")
    ckpt_io.set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True)["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]


def test_unwrap_strips_compile_wrapper(model):
    compiled = torch.compile(model)
    assert unwrap(compiled) is model
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in unwrap(compiled).state_dict())


def test_adopt_best_links_the_source_runs_best_only_when_it_is_the_one_the_state_names(tmp_path, model):
    """``--resume PATH`` into a new run folder: that folder needs the best.pt the restored state refers to."""
    src, new, other = tmp_path / "src", tmp_path / "new", tmp_path / "other"
    last = {**state(6, model), "state": {"best_epoch": 1}}
    ckpt_io.save_best({**state(3, model), "state": {"best_epoch": 1}}, src)
    path = ckpt_io.save_last(last, src, keep_last=3)
    new.mkdir()
    assert ckpt_io.adopt_best(path, last, new)
    assert ckpt_io.load_checkpoint(new / ckpt_io.BEST)["step"] == 3
    assert ckpt_io.load_checkpoint(src / ckpt_io.BEST)["step"] == 3  # the source run keeps its own
    other.mkdir()
    assert not ckpt_io.adopt_best(src / ckpt_io.LAST, {**last, "state": {"best_epoch": 2}}, other)
    assert not ckpt_io.adopt_best(tmp_path / "elsewhere" / "last.pt", last, other)
    assert not (other / ckpt_io.BEST).exists()


def run_state(step: int, model, run_id: str, best_epoch: int, best_step: int) -> dict:
    return {**state(step, model), "state": {"run_id": run_id, "best_epoch": best_epoch, "best_step": best_step}}


def test_best_pt_is_written_between_the_step_checkpoint_and_last_pt(tmp_path, model, monkeypatch):
    written = []
    save, link = ckpt_io.atomic_save, ckpt_io._link_atomic
    monkeypatch.setattr(ckpt_io, "atomic_save", lambda obj, path: written.append(path.name) or save(obj, path))
    monkeypatch.setattr(ckpt_io, "_link_atomic", lambda src, dst: written.append(dst.name) or link(src, dst))
    ckpt_io.save_last(run_state(6, model, "r1", 2, 6), tmp_path, keep_last=3, best=True)
    assert written == ["step-00000006.pt", "best.pt", "last.pt"]


def test_a_kill_before_best_pt_was_written_is_repaired_from_the_newest_checkpoint(tmp_path, model):
    ckpt_io.save_last(run_state(6, model, "r1", 2, 6), tmp_path, keep_last=3, best=True)
    # Epoch 3 was better: its step checkpoint was written, then the run was killed before best.pt.
    newest = run_state(8, model, "r1", 3, 8)
    ckpt_io.atomic_save(newest, ckpt_io.step_path(tmp_path, 8))
    path, _ = ckpt_io.find_resume(tmp_path)
    assert path == ckpt_io.step_path(tmp_path, 8)
    assert ckpt_io.adopt_best(path, ckpt_io.load_checkpoint(path), tmp_path)
    assert ckpt_io.load_checkpoint(tmp_path / ckpt_io.BEST)["step"] == 8
    aside = list(tmp_path.glob("best-unmatched-*.pt"))  # the older best.pt is kept, never used
    assert len(aside) == 1 and ckpt_io.load_checkpoint(aside[0])["step"] == 6


def test_a_best_pt_of_another_run_is_never_adopted(tmp_path, model):
    src, out = tmp_path / "src", tmp_path / "out"
    ckpt_io.save_last(run_state(4, model, "mine", 1, 4), src, keep_last=3, best=True)
    last = ckpt_io.save_last(run_state(6, model, "mine", 1, 4), src, keep_last=3)
    ckpt_io.save_best(run_state(4, model, "someone-else", 1, 4), out)  # same epoch and step, another run
    assert ckpt_io.adopt_best(last, ckpt_io.load_checkpoint(last), out)  # --resume src/last.pt into out
    assert ckpt_io.load_checkpoint(out / ckpt_io.BEST)["state"]["run_id"] == "mine"
    assert [ckpt_io.load_checkpoint(p)["state"]["run_id"] for p in out.glob("best-unmatched-*.pt")] == ["someone-else"]
    assert not ckpt_io.best_matches(ckpt_io.load_checkpoint(src / ckpt_io.BEST), run_state(6, model, "mine", 2, 6))
