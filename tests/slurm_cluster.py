"""A private one-node SLURM on localhost for the real-SLURM test (tests/test_slurm.py).

``ensure_installed()`` installs Debian's ``slurm-wlm`` and ``munge`` when they are absent (as root,
with apt; service start-up is suppressed, so nothing starts by itself), and ``Cluster`` runs its own
``munged``, ``slurmctld`` and ``slurmd`` from a temporary folder: own config (``SLURM_CONF``), own
munge socket and key, free ports, state and logs under that folder; a system SLURM, if any, is not
touched. ``Cluster.stop()`` cancels every job, shuts the daemons down and checks that none of their
processes is left (killing a straggler by its pid).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "scontrol")
PACKAGES = ("slurm-wlm", "munge")
INSTALL_LOCK = "/tmp/recon-slurm-install.lock"
POLICY_RC = Path("/usr/sbin/policy-rc.d")


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None]


def ensure_installed(timeout: float = 900) -> str | None:
    """None when SLURM and munge can be run here, else the reason to skip (one line)."""
    if not sys.platform.startswith("linux"):
        return f"a local SLURM needs Linux (this is {sys.platform})"
    if os.environ.get("RECON_NO_SLURM"):
        return "RECON_NO_SLURM is set"
    if os.geteuid() != 0:
        return "the one-node SLURM runs slurmd as root; run the suite as root (CI does)"
    if not missing_binaries():
        return None
    if shutil.which("apt-get") is None:
        return f"{', '.join(missing_binaries())} not installed and no apt-get to install {' '.join(PACKAGES)}"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    import fcntl

    with open(INSTALL_LOCK, "w") as lock:  # two suites installing at once would fight over dpkg's lock
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not missing_binaries():
            return None
        # Debian starts services from postinst; a policy-rc.d that says 101 keeps munge/slurm stopped.
        own_policy = not POLICY_RC.exists()
        if own_policy:
            POLICY_RC.write_text("#!/bin/sh\nexit 101\n")
            POLICY_RC.chmod(0o755)
        try:
            for cmd in (["apt-get", "update", "-q"],
                        ["apt-get", "install", "-y", "-q", "--no-install-recommends",
                         "-o", "DPkg::Lock::Timeout=300", *PACKAGES]):
                try:
                    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
                except subprocess.TimeoutExpired:
                    return f"`{' '.join(cmd)}` took over {timeout:.0f} s"
                if r.returncode != 0:
                    last = (r.stderr.strip() or r.stdout.strip() or "no output").splitlines()[-1]
                    return f"`{' '.join(cmd)}` failed ({r.returncode}): {last}"
        finally:
            if own_policy:
                POLICY_RC.unlink(missing_ok=True)
    missing = missing_binaries()
    return f"still missing after apt-get install: {', '.join(missing)}" if missing else None


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _descendants(pids: list[int]) -> set[int]:
    """Every process below ``pids`` (from /proc; slurmstepd and job processes live under slurmd)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(") ", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), list(pids)
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


class Cluster:
    """``munged`` + ``slurmctld`` + ``slurmd`` with one partition ``debug`` on this host."""

    partition = "debug"

    def __init__(self, root: Path, cpus: int = 4, memory_mb: int = 4000):
        self.root = Path(root)
        self.cpus, self.memory_mb = cpus, memory_mb
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.munge_dir = self.root / "munge"
        self.socket = self.munge_dir / "sock"
        self.pids: dict[str, int] = {}

    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        r = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
        return r

    def _write_config(self) -> None:
        ctld_port, d_port = _free_ports(2)
        r = self.root
        lines = [
            "ClusterName=recontest",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            "SlurmUser=root", "SlurmdUser=root",
            f"SlurmctldPort={ctld_port}", f"SlurmdPort={d_port}",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={self.socket}",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill", "SchedulerParameters=sched_interval=2",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "MpiDefault=none", "ReturnToService=2",
            "KillWait=5",     # scancel: SIGTERM, then SIGKILL 5 s later (submitit ignores SIGTERM)
            "MinJobAge=600",  # finished jobs stay visible to squeue during the test
            "SlurmdParameters=config_overrides",  # declare more CPUs than this small machine has
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN",
            f"PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 60) -> None:
        for d in ("state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.munge_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = self.munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self._write_config()
        m = self.munge_dir
        subprocess.run(["munged", "--force", f"--socket={self.socket}", f"--key-file={key}",
                        f"--pid-file={m / 'munged.pid'}", f"--log-file={m / 'munged.log'}",
                        f"--seed-file={m / 'munged.seed'}"], check=True, capture_output=True, timeout=30)
        self.pids["munged"] = int((m / "munged.pid").read_text())
        self.run("slurmctld", "-f", str(self.conf))
        self.run("slurmd", "-f", str(self.conf), "-N", self.node)
        deadline = time.monotonic() + timeout
        while True:
            r = self.run("sinfo", "-h", "-N", "-o", "%T", check=False)
            if r.returncode == 0 and r.stdout.strip() in ("idle", "mixed", "allocated"):
                break
            if time.monotonic() > deadline:
                logs = "; ".join(p.read_text()[-300:] for p in (self.root / "log").glob("*.log"))
                raise RuntimeError(f"one-node SLURM did not come up in {timeout:.0f} s "
                                   f"(sinfo: {r.stdout.strip() or r.stderr.strip()}); logs: {logs}")
            time.sleep(0.5)
        for name in ("slurmctld", "slurmd"):
            self.pids[name] = int((self.root / f"{name}.pid").read_text())

    def job_ids(self) -> list[str]:
        r = self.run("squeue", "-h", "-o", "%i", check=False)
        return r.stdout.split() if r.returncode == 0 else []

    def wait_idle(self, timeout: float = 60) -> None:
        """Until no job is pending or running."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.run("squeue", "-h", "-t", "PENDING,RUNNING,CONFIGURING,COMPLETING", "-o", "%i", check=False)
            if r.returncode == 0 and not r.stdout.strip():
                return
            time.sleep(0.5)
        raise TimeoutError(f"jobs still queued after {timeout:.0f} s: {self.job_ids()}")

    def stop(self) -> list[int]:
        """Cancel all jobs, stop the daemons; returns the pids that had to be killed (ideally none)."""
        daemons = [p for p in (self.pids.get("slurmctld"), self.pids.get("slurmd")) if p]
        if daemons:
            self.run("scancel", "--full", "--user", "root", check=False)
            try:
                self.wait_idle(30)
            except TimeoutError:
                pass
        tree = _descendants(daemons) | set(daemons)
        if daemons:
            self.run("scontrol", "shutdown", check=False)
        if self.pids.get("munged"):
            deadline = time.monotonic() + 20
            while any(_pid_alive(p) for p in tree) and time.monotonic() < deadline:
                time.sleep(0.2)
            subprocess.run(["munged", "--stop", f"--socket={self.socket}"], capture_output=True, timeout=30)
            tree.add(self.pids["munged"])
        deadline = time.monotonic() + 10
        while any(_pid_alive(p) for p in tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        killed = []
        for pid in tree:
            if _pid_alive(pid):
                try:
                    os.kill(pid, 9)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
        self.pids.clear()
        return killed
