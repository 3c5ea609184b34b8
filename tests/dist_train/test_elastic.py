"""Exact, elastic resume through the real torchrun (gloo, CPU): a run stopped mid-epoch at 2 processes,
resumed at 1, stopped again mid-epoch and resumed at 3, trains on exactly the samples of the
uninterrupted 2-process run, step by step (``--trace-samples``)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from dist_train import checkpoint as ckpt_io
from dist_train import data
from preprocess.shard_format import load_manifest
from tests.conftest import make_shards, make_videos
from tests.dist_train.dt_helpers import TINY, check, results, run_trainer

pytestmark = pytest.mark.slow

EPOCHS, GLOBAL_BATCH = 2, 6  # 38 training clips (4 of 42 validate): 6 steps an epoch, 2 clips left out


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """60 clips in shards of 8: 42 train (6 shards) and 18 test."""
    root = tmp_path_factory.mktemp("elastic")
    return make_shards(make_videos(root / "data", classes=2, clips=30), root / "shards", shard_size=8)


def base(shards: Path, out: Path) -> list[str]:
    return ["--shards", str(shards), "--out", str(out), *TINY, "--epochs", str(EPOCHS), "--global-batch",
            str(GLOBAL_BATCH), "--trace-samples", "--test-every", "0", "--log-every", "1"]


def trace(out: Path) -> dict[int, list[str]]:
    """Global step -> the keys all ranks trained on in it, in rank order (that is, in global order)."""
    per_step: dict[int, dict[int, list[str]]] = defaultdict(dict)
    for line in (out / "samples.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert row["rank"] not in per_step[row["step"]], f"step {row['step']} rank {row['rank']} twice"
        per_step[row["step"]][row["rank"]] = row["keys"]
    return {step: [k for r in sorted(ranks) for k in ranks[r]] for step, ranks in sorted(per_step.items())}


def epochs_of(out: Path) -> dict[int, list[str]]:
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    got: dict[int, list[str]] = defaultdict(list)
    for row in rows:
        got[row["epoch"]] += row["keys"]
    return got


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("elastic_runs")
    ref = tmp / "ref"
    check(run_trainer(base(shards, ref), nproc=2, timeout=300))
    out, legs = tmp / "run", []
    for nproc, stop_at, extra in ((2, 4, ["--workers", "1"]), (1, 9, ["--workers", "2"]),
                                  (3, None, ["--workers", "1"])):
        env = {"DIST_TRAIN_FAULT_INJECTION": "1", "DIST_TRAIN_TEST_STOP_AT_STEP": str(stop_at)} if stop_at else {}
        proc = run_trainer([*base(shards, out), *extra], nproc=nproc, timeout=400, env=env)
        legs.append({"nproc": nproc, "stop_at": stop_at, "proc": proc,
                     "status": json.loads((out / "status.json").read_text())})
    return {"ref": ref, "out": out, "legs": legs, "shards": shards}


def test_each_leg_stopped_where_asked_and_resumed_at_another_world_size(runs):
    legs = runs["legs"]
    assert [leg["status"]["state"] for leg in legs] == ["stopped", "stopped", "completed"]
    assert [leg["status"].get("step") for leg in legs[:2]] == [4, 9]  # mid-epoch 1 (steps 1-6), mid-epoch 2 (7-12)
    output = [leg["proc"].stdout + leg["proc"].stderr for leg in legs]
    for text in output[1:]:
        assert "the data order goes on from the same position (global batch 6)" in text
    assert "1 x 2 x 3 accumulation" in output[1] and "3 x 2 x 1 accumulation" in output[2]
    assert ("warning: the global batch 6 over 1 process(es) runs as micro-batches of 2 x 3 accumulation steps per "
            "process (--batch-size 2 and --accum-steps 1 give way to it)") in output[1]
    res = results(runs["out"])
    assert res["world_size"] == 3 and res["global_batch"] == GLOBAL_BATCH and res["steps"] == EPOCHS * 6
    ck = ckpt_io.load_checkpoint(runs["out"] / "last.pt")
    assert ck["data"] == {"epoch": EPOCHS, "samples_consumed": 0, "global_batch": GLOBAL_BATCH,
                          "digest": data.data_digest(load_manifest(runs["shards"]))}


def test_every_global_step_trains_on_the_same_samples_as_the_uninterrupted_run(runs):
    ref, got = trace(runs["ref"]), trace(runs["out"])
    assert list(ref) == list(range(1, EPOCHS * 6 + 1)) and list(got) == list(ref)
    for step in ref:
        assert got[step] == ref[step], f"step {step}"  # the same keys in the same global order
        assert len(ref[step]) == GLOBAL_BATCH


def test_each_epoch_visits_every_training_sample_once_but_a_rotating_remainder(runs):
    m = load_manifest(runs["shards"])
    val = set(json.loads((runs["ref"] / "validation.json").read_text())["keys"])
    train = {k for s in m.shards["train"] for k in s.keys} - val
    assert len(val) == 4 and len(train) == 38
    left_out = []
    for epoch, keys in epochs_of(runs["out"]).items():
        assert len(keys) == len(set(keys)) == 36 and set(keys) <= train, epoch
        left_out.append(train - set(keys))
    assert all(len(x) == 2 for x in left_out) and not left_out[0] & left_out[1]  # rotates: never the same clip


def test_a_resume_that_would_change_the_global_batch_is_refused_naming_the_flag(runs, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(runs["ref"], out)
    args = [*base(runs["shards"], out), "--resume", str(ckpt_io.step_path(out, 6))]
    proc = check(run_trainer([*args, "--global-batch", "4"], nproc=None, timeout=120), 2)  # exit 2: configuration
    assert "trained with --global-batch 6, this run asks for 4: pass --global-batch 6" in proc.stderr
    i = args.index("--global-batch")
    proc = check(run_trainer([*args[:i], *args[i + 2:], "--batch-size", "4"], nproc=4, timeout=180), 1)  # torchrun: 1
    assert "--global-batch 6 does not split evenly over 4 processes: start 1, 2, 3, 6 processes (a resumed run keeps" \
        in proc.stderr
    assert "exitcode  : 2" in proc.stderr
    # The order and the validation set depend on the seed, the hold-out, the window and the shards: kept too.
    proc = check(run_trainer([*args, "--seed", "1"], nproc=None, timeout=120), 2)
    assert "the checkpoint was trained with --seed 0 (this run: 1): pass the same values" in proc.stderr
    repacked = make_shards(make_videos(tmp_path / "data", classes=2, clips=30), tmp_path / "repacked", shard_size=6)
    i = args.index("--shards")
    proc = check(run_trainer([*args[:i + 1], str(repacked), *args[i + 2:]], nproc=None, timeout=120), 2)
    assert "is not the shard set the checkpoint was trained on" in proc.stderr


def test_a_trace_line_cut_short_by_a_kill_is_dropped_on_resume(tmp_path):
    from dist_train.trace import SAMPLES_FILE, trim

    lines = [json.dumps({"epoch": 0, "step": s, "rank": r, "keys": ["a"]}) for s in (1, 2, 3) for r in (0, 1)]
    (tmp_path / SAMPLES_FILE).write_text("\n".join(lines) + "\n" + lines[0][:17])  # torn mid-line by a SIGKILL
    trim(tmp_path, 2)  # resumed at step 2
    assert (tmp_path / SAMPLES_FILE).read_text().splitlines() == lines[:4]
