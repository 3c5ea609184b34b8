"""A real two-node SLURM cluster on this one machine, for tests.

Installs nothing: it uses Debian's ``slurm-wlm`` and ``munge`` when they are there and the tests run as
root, and otherwise says why not (``why_unavailable``). Everything lives in one temp dir: the munge key
and socket, ``slurm.conf``, state, spool and logs. Daemons run in the foreground as children of this
process (munged, slurmctld, ``slurmd -N n1``, ``slurmd -N n2``), each node on its own port, both named
127.0.0.1. Commands reach this cluster through ``SLURM_CONF`` in :attr:`SlurmCluster.env`; nothing in
``/etc`` is touched and the process environment of the caller is left alone.

Teardown cancels the cluster's jobs, stops the daemons it started by pid (SIGTERM, bounded wait, then
SIGKILL), then kills any left-over job process that carries this cluster's ``SLURM_CONF`` in its
environment (slurmstepd and job steps are re-parented away from slurmd, so pids alone would miss them).

    with SlurmCluster(tmp) as c:
        job = c.sbatch(["--nodes=2", "job.sh"])
        c.wait_job(job, "COMPLETED", timeout=60)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
NODES = ("n1", "n2")
CPUS_PER_NODE = 2
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
                   "BOOT_FAIL", "DEADLINE"}


class SlurmError(RuntimeError):
    """The test cluster did not start or a job did not reach the expected state; the message has the logs."""


def why_unavailable() -> str | None:
    """Why a test cluster cannot be started here, or None when it can."""
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
    if missing:
        return f"SLURM/munge not installed (missing {', '.join(missing)}); apt-get install slurm-wlm munge"
    if os.geteuid() != 0:
        return "the SLURM test cluster needs root (slurmd runs jobs as any user); run the tests as root"
    return None


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SlurmCluster:
    """munged + slurmctld + two slurmd (n1, n2) in ``root``; a context manager that always cleans up."""

    def __init__(self, root: Path, start_timeout: float = 60.0):
        self.root = Path(root)
        self.start_timeout = start_timeout
        self.conf = self.root / "etc" / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.log_dir = self.root / "log"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        # Leaked user settings would change what sbatch/srun do; the cluster must behave the same everywhere.
        for k in list(self.env):
            if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SQUEUE_", "SINFO_")) and k != "SLURM_CONF":
                del self.env[k]

    # ---------------------------------------------------------------- lifecycle
    def __enter__(self) -> SlurmCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        """Write the config, start the daemons and wait until both nodes are idle."""
        for d in ("etc", "munge", "state", "spool/n1", "spool/n2", "run", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self._start_munged()
        ports = _free_ports(1 + len(NODES))
        self.conf.write_text(self._slurm_conf(ports[0], ports[1:]))
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        for node in NODES:
            self._spawn(f"slurmd-{node}", [_which("slurmd"), "-D", "-N", node, "-f", str(self.conf)])
        self._wait_nodes_idle()

    def stop(self) -> None:
        """Cancel jobs, stop the daemons started here (by pid) and any stray process of this cluster."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            try:
                self.run(["scancel", "--user", "root", "--quiet"], check=False, timeout=10)
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline and self.run(["squeue", "-h", "-o", "%i"], check=False,
                                                               timeout=10).stdout.strip():
                    time.sleep(0.3)
            except subprocess.TimeoutExpired:
                pass
        for name in reversed(list(self.procs)):
            _terminate(self.procs[name])
        self.procs.clear()
        deadline = time.monotonic() + 3
        while (strays := self._strays()) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in strays:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.log_dir / f"{name}.out", "ab")
        try:
            # Own session: a Ctrl-C in the test terminal must not reach the daemons before teardown does.
            self.procs[name] = subprocess.Popen(argv, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                                stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()

    def _start_munged(self) -> None:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        (self.root / "munge").chmod(0o700)
        # --force: munged refuses to run as root or with a socket outside /run/munge otherwise.
        self._spawn("munged", [
            _which("munged"), "--foreground", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
            f"--pid-file={self.root / 'munge' / 'munged.pid'}", f"--seed-file={self.root / 'munge' / 'seed'}",
            f"--log-file={self.log_dir / 'munged.log'}", "--num-threads=2",
        ])
        deadline = time.monotonic() + 15
        while not self.munge_socket.exists():
            if self.procs["munged"].poll() is not None or time.monotonic() > deadline:
                raise SlurmError(f"munged did not start\n{self.logs()}")
            time.sleep(0.05)

    def _slurm_conf(self, ctld_port: int, node_ports: list[int]) -> str:
        r = self.root
        host = socket.gethostname().split(".")[0]
        nodes = "\n".join(
            f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs={CPUS_PER_NODE} "
            f"RealMemory=1000 State=UNKNOWN" for n, p in zip(NODES, node_ports))
        return f"""\
# Written by tests/slurm_cluster.py: a throw-away two-node cluster on one machine.
ClusterName=vidshardtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
JobRequeue=1
KillWait=5
MinJobAge=600
SlurmdTimeout=30
InactiveLimit=0
MessageTimeout=10
{nodes}
PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""

    def _wait_nodes_idle(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        out = ""
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise SlurmError(f"{name} exited with {p.returncode} during start-up\n{self.logs()}")
            r = self.run(["sinfo", "--noheader", "-N", "-o", "%N %t"], check=False, timeout=10)
            out = r.stdout
            states = dict(line.split() for line in out.splitlines() if len(line.split()) == 2)
            if all(states.get(n) == "idle" for n in NODES):
                return
            time.sleep(0.2)
        raise SlurmError(f"nodes not idle after {self.start_timeout}s: {out!r}\n{self.logs()}")

    def _strays(self) -> list[int]:
        """Pids (not ours) whose environment holds this cluster's SLURM_CONF: job steps, slurmstepd."""
        marker = f"SLURM_CONF={self.conf}".encode()
        mine = {os.getpid()} | {p.pid for p in self.procs.values() if p.poll() is None}
        found = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) in mine:
                continue
            try:
                if marker in (d / "environ").read_bytes().split(b"\0"):
                    found.append(int(d.name))
            except OSError:
                continue
        return found

    # ---------------------------------------------------------------- commands
    def run(self, argv: list[str], check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        """Run a SLURM command against this cluster; output captured as text."""
        r = subprocess.run(argv, env=kw.pop("env", self.env), capture_output=True, text=True, timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise SlurmError(f"{' '.join(argv)} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r

    def sbatch(self, args: list[str], env: dict | None = None, cwd: str | Path | None = None) -> int:
        """Submit with the real sbatch and return the job id."""
        e = dict(self.env if env is None else env)
        e["SLURM_CONF"] = str(self.conf)
        r = self.run(["sbatch", "--parsable", *args], env=e, cwd=cwd)
        return int(r.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, RunTime, Restarts, NodeList, ExitCode, ...)."""
        r = self.run(["scontrol", "show", "job", "-o", str(job_id)])
        fields = {}
        for tok in r.stdout.split():
            k, _, v = tok.partition("=")
            fields.setdefault(k, v)
        return fields

    def wait_job(self, job_id: int, states: str | set[str], timeout: float, poll: float = 0.5) -> dict[str, str]:
        """Wait until the job is in one of ``states``; a terminal state not asked for fails at once."""
        want = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            state = info.get("JobState", "")
            if state in want:
                return info
            if state in TERMINAL_STATES:
                break
            time.sleep(poll)
        raise SlurmError(f"job {job_id} in {info.get('JobState')!r}, wanted {sorted(want)}\n{info}\n{self.logs()}")

    def release_requeued(self, job_id: int, timeout: float = 30) -> None:
        """Let a requeued job start now instead of after SLURM's ~120 s hold (BeginTime).

        The hold exists because the nodes revoke the old run's credential at the requeue, to one-second
        resolution: a run started in that same second is killed at launch ("Job credential revoked").
        So wait until both nodes are idle again and a clock second has passed, then set StartTime=now.
        """
        self.wait_job(job_id, "PENDING", timeout=timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.run(["sinfo", "--noheader", "-N", "-o", "%N %t"], check=False, timeout=10).stdout
            if all(line.split()[1] == "idle" for line in out.splitlines() if len(line.split()) == 2):
                break
            time.sleep(0.2)
        time.sleep(2.0)
        self.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])

    def logs(self, tail: int = 40) -> str:
        """The last lines of every daemon log, for failure messages."""
        parts = []
        for f in sorted(self.log_dir.glob("*")):
            lines = f.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(parts)


def _terminate(p: subprocess.Popen, grace: float = 10.0) -> None:
    if p.poll() is not None:
        return
    p.terminate()
    try:
        p.wait(grace)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(5)
