"""A Ray cluster of several nodes on this one machine, each node a `ray start` of its
own (its own raylet and object store), for testing and measuring `memgen eval --ray`
across nodes without a second machine: `tests/test_distributed.py` and
`bench/bench_replicas.py` use it.

Every node is on a loopback address (default 127.0.0.2: `ray start` rewrites 127.0.0.1
and `localhost` to the machine's outward address, any other 127.x.y.z is kept), every
port is picked free and named on the command line (no default port such as 6379 or
8265 is taken from another cluster on the machine), and the cluster has its own temp
dir. `stop()` ends only this cluster's processes, found by that temp dir and their
node-manager ports, never by name (`ray stop` would end every Ray cluster of the user).

    with LocalCluster(num_nodes=2) as cluster:      # head + 1 node, 1 CPU each
        ...  memgen eval DATA --ray-address cluster.address ...
        cluster.kill_node(1)                       # SIGKILL the second node's raylet
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# GCS marks a node dead after `threshold` failed health checks `period` apart (Ray's
# defaults, 3 s x 5, leave a run waiting ~15-30 s on a dead node's tasks)
FAST_FAILURE_DETECTION = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                          "RAY_health_check_failure_threshold": "3", "RAY_health_check_initial_delay_ms": "1000"}

# for the cluster's processes and its drivers: no usage stats; token auth on, with the user's
# default token (~/.ray/auth_token, written if missing as any local ray.init() does): a process
# that has run a local ray.init() is in token mode for good and cannot talk to a cluster without it
LOCAL_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}


def ensure_auth_token() -> None:
    """Ray's default token file, made by Ray's own `ray get-auth-token --generate` when
    there is none (and no RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH names one)."""
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    if (Path.home() / ".ray" / "auth_token").exists():
        return
    from ray._private.authentication.authentication_token_setup import generate_and_save_token

    generate_and_save_token()


def connect(address: str) -> None:
    """ray.init(address) from this process, in the cluster's auth mode (refreshing Ray's
    cached config, as Ray does when it turns token auth on)."""
    import ray
    from ray._raylet import Config

    os.environ.update(LOCAL_ENV)
    Config.initialize("")
    ray.init(address=address, log_to_driver=False)


def _free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, command line) of every process we can read."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        table[int(entry)] = (ppid, cmd)
    return table


def _with_descendants(pids: set[int], table: dict[int, tuple[int, str]]) -> set[int]:
    found, grew = set(pids), True
    while grew:
        kids = {pid for pid, (ppid, _) in table.items() if ppid in found} - found
        found |= kids
        grew = bool(kids)
    return found


class LocalCluster:
    """`num_nodes` Ray nodes started by `ray start` on `host` (node 0 is the head),
    `num_cpus` CPUs and `object_store_bytes` of object store each. `env` is added to
    every Ray process's environment, after FAST_FAILURE_DETECTION (unless
    `fast_failure_detection` is false: Ray's own health-check defaults)."""

    def __init__(self, num_nodes: int = 2, num_cpus: int = 1, object_store_bytes: int = 100_000_000,
                 host: str = "127.0.0.2", env: dict[str, str] | None = None, start_timeout_s: float = 120,
                 fast_failure_detection: bool = True):
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
        self.num_nodes, self.num_cpus, self.object_store_bytes = num_nodes, num_cpus, object_store_bytes
        self.host, self.start_timeout_s = host, start_timeout_s
        # RAY_AUTH_MODE explicit for every node: `ray start --head` turns token auth on by itself
        # when a ~/.ray/auth_token exists, a worker node's `ray start` does not, and is refused
        self.env = {**os.environ, **LOCAL_ENV, **(FAST_FAILURE_DETECTION if fast_failure_detection else {}),
                    **(env or {})}
        self.temp_dir: str | None = None
        self.address: str | None = None
        self.node_manager_ports: list[int] = []
        self.killed: set[int] = set()

    # -- start / stop ------------------------------------------------------------------
    def _ray(self) -> str:
        exe = Path(sys.executable).with_name("ray")
        return str(exe) if exe.exists() else (shutil.which("ray") or "ray")

    def _node_args(self) -> list[str]:
        nm, om, agent, agent_grpc, metrics, renv, wmin = _free_ports(7)
        self.node_manager_ports.append(nm)
        # a worker-port range of its own above the ephemeral port just picked, away from Ray's
        # default 10002-19999 that other clusters on the machine use
        base = 20000 + (wmin * 7 + len(self.node_manager_ports) * 211) % 40000
        return ["--node-ip-address", self.host, "--num-cpus", str(self.num_cpus),
                "--object-store-memory", str(self.object_store_bytes), "--temp-dir", self.temp_dir,
                "--disable-usage-stats", "--node-manager-port", str(nm), "--object-manager-port", str(om),
                "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
                "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(renv),
                "--min-worker-port", str(base), "--max-worker-port", str(base + 199)]

    def _run(self, args: list[str]) -> None:
        try:
            out = subprocess.run([self._ray(), "start", *args], env=self.env, capture_output=True, text=True,
                                 timeout=self.start_timeout_s, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"ray start did not return in {self.start_timeout_s:.0f} s") from e
        if out.returncode != 0:
            raise RuntimeError(f"ray start failed ({out.returncode}):\n{(out.stdout + out.stderr)[-3000:]}")

    def start(self) -> "LocalCluster":
        # short: Ray's unix socket paths (under the temp dir) must fit in 107 bytes
        ensure_auth_token()
        self.temp_dir = tempfile.mkdtemp(prefix="mgray-", dir="/tmp")
        try:
            gcs, dashboard = _free_ports(2)
            self._run(["--head", "--port", str(gcs), "--include-dashboard", "false",
                       "--dashboard-port", str(dashboard), *self._node_args()])
            self.address = f"{self.host}:{gcs}"
            for _ in range(1, self.num_nodes):
                self._run(["--address", self.address, *self._node_args()])
        except BaseException:
            self.stop()
            raise
        return self

    def processes(self) -> set[int]:
        """This cluster's processes: every one whose command line names its temp dir
        (GCS, raylets, agents, monitors) and their descendants (workers, actors)."""
        if self.temp_dir is None:
            return set()
        table = _proc_table()
        mine = {pid for pid, (_, cmd) in table.items() if self.temp_dir in cmd and pid != os.getpid()}
        return _with_descendants(mine, table) - {os.getpid()}

    def stop(self) -> None:
        """End this cluster's processes (SIGTERM, then SIGKILL after 1 s: a test cluster keeps
        nothing worth a clean shutdown) and remove its temp dir."""
        pids = self.processes()
        for sig, wait_s in ((signal.SIGTERM, 1.0), (signal.SIGKILL, 5.0)):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait_s
            while pids and time.monotonic() < deadline:
                pids = {p for p in pids if Path(f"/proc/{p}").exists() and not _is_zombie(p)}
                time.sleep(0.1)
            if not pids:
                break
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- nodes -------------------------------------------------------------------------
    def raylet_pid(self, node: int) -> int:
        """The pid of node `node`'s raylet (0 is the head)."""
        flag = f"--node_manager_port={self.node_manager_ports[node]}"
        for pid, (_, cmd) in _proc_table().items():
            if "raylet" in cmd.split(" ", 1)[0] and flag in cmd.split() and self.temp_dir in cmd:
                return pid
        raise LookupError(f"no raylet of node {node} (node manager port {self.node_manager_ports[node]})")

    def kill_node(self, node: int) -> float:
        """SIGKILL node `node`'s raylet, as a machine that dies: its workers and actors exit
        when they lose it, its object store goes with it, and GCS marks the node dead after
        its missed health checks. Returns time.monotonic() of the kill."""
        if node == 0:
            raise ValueError("node 0 is the head (GCS and the driver's node): kill another one")
        pid = self.raylet_pid(node)
        os.kill(pid, signal.SIGKILL)
        self.killed.add(node)
        return time.monotonic()

    def node_id(self, node: int) -> str:
        """Node `node`'s Ray node id (needs `ray.init(address=self.address)` in this process)."""
        import ray

        port = self.node_manager_ports[node]
        for n in ray.nodes():
            if n["NodeManagerPort"] == port:
                return n["NodeID"]
        raise LookupError(f"node {node} is not registered")


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True
