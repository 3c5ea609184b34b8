"""The test cluster itself: two nodes up, a real two-node sbatch job runs on both."""

from __future__ import annotations

from tests.slurm_cluster import NODES


def test_two_node_job_runs_on_both_nodes(slurm_cluster, tmp_path):
    script = tmp_path / "hello.sh"
    script.write_text("#!/bin/bash\nsrun bash -c 'echo \"task $SLURM_PROCID on $SLURMD_NODENAME\"'\n")
    out = tmp_path / "hello.out"
    job = slurm_cluster.sbatch(["--nodes=2", "--ntasks-per-node=1", "--job-name=hello", f"--output={out}",
                                str(script)], cwd=tmp_path)
    info = slurm_cluster.wait_job(job, "COMPLETED", timeout=60)
    assert info["ExitCode"] == "0:0"
    lines = sorted(out.read_text().split("\n"))
    assert [ln for ln in lines if ln] == [f"task {i} on {n}" for i, n in enumerate(NODES)]
