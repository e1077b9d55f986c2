"""A two-node Ray cluster on this machine for the tests: a head and a worker node, each started by
``ray start`` as its own set of processes with its own CPUs, and stopped process by process.

Every port is picked free and the cluster has its own temporary directory, so the tests never
touch another Ray instance on the machine; ``stop`` kills exactly the processes whose command line
names that directory or the head's address (and their children), never ``ray stop`` (which would
stop every Ray instance of the machine).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import portpicker
import psutil
from ray.util import get_node_ip_address

RAY = str(Path(sys.executable).parent / "ray")
OBJECT_STORE_BYTES = 80 * 1024 * 1024  # Ray's minimum is 75 MiB
WORKER_HOST = "127.0.0.2"
"""The worker node's address: not the head's, so that a driver can attach to the head's raylet
(Ray picks a driver's raylet by address) and survive the worker node's death."""


def _ports(*names: str) -> dict[str, int]:
    return {name: portpicker.pick_unused_port() for name in names}


def _ray_start(args: list[str], env: dict[str, str]) -> None:
    result = subprocess.run(
        [RAY, "start", *args], env=env, capture_output=True, text=True, timeout=180
    )
    if result.returncode != 0:
        raise RuntimeError(f"ray start {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")


@dataclass
class RayCluster:
    temp_dir: Path
    address: str = ""
    head_host: str = ""
    worker_node_manager_port: int = 0
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def start(cls, cpus_per_node: int = 1) -> RayCluster:
        # Short: Ray's unix socket paths under it must stay below 108 characters.
        cluster = cls(Path(tempfile.mkdtemp(prefix="fwray", dir="/tmp")))
        head_host = cluster.head_host = get_node_ip_address()
        cluster.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        common = [
            f"--num-cpus={cpus_per_node}",
            f"--object-store-memory={OBJECT_STORE_BYTES}",
            "--disable-usage-stats",
        ]
        try:
            head = _ports(
                "port",
                "node-manager-port",
                "object-manager-port",
                "ray-client-server-port",
                "dashboard-port",
                "dashboard-agent-listen-port",
                "dashboard-agent-grpc-port",
                "runtime-env-agent-port",
                "metrics-export-port",
            )
            _ray_start(
                [
                    "--head",
                    f"--temp-dir={cluster.temp_dir}",
                    "--include-dashboard=false",
                    f"--node-ip-address={head_host}",
                    *common,
                    *(f"--{k}={v}" for k, v in head.items()),
                ],
                cluster.env,
            )
            cluster.address = f"{head_host}:{head['port']}"
            worker = _ports(
                "node-manager-port",
                "object-manager-port",
                "dashboard-agent-listen-port",
                "dashboard-agent-grpc-port",
                "runtime-env-agent-port",
                "metrics-export-port",
            )
            cluster.worker_node_manager_port = worker["node-manager-port"]
            _ray_start(
                [
                    f"--address={cluster.address}",
                    f"--node-ip-address={WORKER_HOST}",
                    *common,
                    *(f"--{k}={v}" for k, v in worker.items()),
                ],
                cluster.env,
            )
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def connect_driver(self) -> None:
        """Connects this process to the cluster through the head's raylet.

        Both nodes share this machine's Ray session files, where the worker node's
        ``--node-ip-address`` is what a new driver would read as its own address.
        """
        import ray

        ray.init(address=self.address, _node_ip_address=self.head_host, log_to_driver=False)

    def processes(self) -> list[psutil.Process]:
        """Every live process of this cluster: its daemons and their children (the workers)."""
        marks = (str(self.temp_dir), self.address) if self.address else (str(self.temp_dir),)
        found: dict[int, psutil.Process] = {}
        for p in psutil.process_iter(["cmdline"]):
            if any(m in arg for arg in p.info["cmdline"] or () for m in marks):
                found[p.pid] = p
        for p in list(found.values()):
            try:
                found.update({c.pid: c for c in p.children(recursive=True)})
            except psutil.NoSuchProcess:
                pass
        return list(found.values())

    def worker_raylet(self) -> psutil.Process:
        flag = f"--node_manager_port={self.worker_node_manager_port}"
        for p in self.processes():
            if flag in (p.cmdline() or ()):
                return p
        raise LookupError(f"no raylet with {flag}")

    def running_on_worker_node(self, task_name: str) -> bool:
        """Whether a worker process of the worker node is executing ``task_name`` now."""
        try:
            children = self.worker_raylet().children()
        except (LookupError, psutil.NoSuchProcess):
            return False
        titles = []
        for child in children:
            try:
                titles.append(" ".join(child.cmdline()))
            except psutil.NoSuchProcess:
                continue
        return any(t.startswith(f"ray::{task_name}") for t in titles)

    def kill_worker_node(self) -> None:
        """Kills the worker node's raylet and everything it started, as a machine failure would."""
        raylet = self.worker_raylet()
        victims = [raylet, *raylet.children(recursive=True)]
        for p in victims:
            p.kill()
        psutil.wait_procs(victims, timeout=30)

    def stop(self) -> None:
        for _ in range(3):  # a daemon may start a child while the others die
            victims = self.processes()
            if not victims:
                break
            for p in victims:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(victims, timeout=30)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def wait_for(condition, timeout: float, what: str) -> None:
    """Polls ``condition`` until it holds; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(0.2)
