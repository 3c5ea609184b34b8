"""launch/slurm/protocol.sbatch on the real test cluster: a one-task array job runs the split of its task id,
then the summary job finds it done and writes protocol.json without redoing anything."""

from __future__ import annotations

import json

from tests.conftest import REPO
from tests.dist_train.dt_helpers import TINY
from tests.dist_train.test_protocol import hmdb_tree
from tests.launch.test_slurm import _job_env, _read

PROTOCOL = REPO / "launch" / "slurm" / "protocol.sbatch"
JOB = ["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]


def test_an_array_task_runs_its_split_and_the_summary_job_redoes_nothing(slurm_cluster, tmp_path):
    data, splits = hmdb_tree(tmp_path)
    out = tmp_path / "hmdb51"
    args = [str(PROTOCOL), "--videos", str(data), "--splits-dir", str(splits), "--out", str(out), "--frames", "8",
            *TINY, "--epochs", "1", "--workers", "0", "--val-fraction", "0"]
    env = _job_env(slurm_cluster, PYTHONPATH=str(REPO))
    task = slurm_cluster.sbatch([*JOB, "--array=2", "--job-name=proto", *args], env=env, cwd=tmp_path)
    try:
        info = slurm_cluster.wait_job(task, "COMPLETED", timeout=240)
    finally:
        print(*(_read(p) for p in tmp_path.glob("slurm-proto-*.out")))
    assert info["ExitCode"] == "0:0"
    report = out / "split2" / "eval-multi" / "report.json"
    made = report.stat().st_mtime_ns
    assert not (out / "split1").exists() and not (out / "split3").exists()  # the task ran its split only
    summary = slurm_cluster.sbatch([*JOB, "--job-name=summary", *args, "--splits", "2"], env=env, cwd=tmp_path)
    slurm_cluster.wait_job(summary, "COMPLETED", timeout=120)
    s = json.loads((out / "protocol.json").read_text())
    assert s["complete"] and list(s["splits"]) == ["2"] and report.stat().st_mtime_ns == made
    assert "reusing the pack" in "".join(_read(p) for p in tmp_path.glob("slurm-summary-*.out"))
