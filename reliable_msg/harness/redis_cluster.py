"""A Redis Cluster of this machine's own: ``redis-server`` nodes on free loopback ports,
joined with ``redis-cli --cluster create``, killed and restarted one at a time, and
removed with everything they wrote.

Each node runs in a directory of its own under :data:`ROOT` (its ``nodes.conf``, log and
pid file). A test run that was itself killed leaves its nodes running: the next cluster
made here kills them (by the pid files of directories whose owner process is gone) and
removes their directories first. The machine's own Redis on 6379 is never touched: the
ports are picked below the kernel's ephemeral range and never 6379.

``python -m reliable_msg.harness.redis_cluster up|down|status`` keeps one cluster for a
shell (in ``ROOT/cli``) and prints its ``redis_url``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from reliable_msg.errors import ReliableMsgError

from .leftovers import Cluster, alive, kill_all, pid_in, read, running
from .ports import paired_ports, port_open

log = logging.getLogger(__name__)
#: Where every cluster made here keeps its nodes' directories.
ROOT = Path(tempfile.gettempdir()) / "rmsg-redis-cluster"
#: Milliseconds without an answer before the other nodes mark a node failed. Small, so
#: a killed master is seen as gone (and a restarted one as back) within seconds.
NODE_TIMEOUT_MS = 1000
#: The cluster bus of a node listens on its port plus this (Redis's fixed offset).
BUS_OFFSET = 10000
#: Client ports are picked here, and their bus ports (30000-32767) stay below the
#: kernel's ephemeral range (32768-), so no outgoing connection takes one meanwhile.
PORT_RANGE = (20000, 22767)
#: The machine's own Redis: never a port of a cluster made here.
MACHINE_REDIS_PORT = 6379
#: Seconds the cluster gets to form, or to take a restarted node back.
READY_WITHIN = 30.0
#: The file naming the process that owns a cluster's directory (a pid, or ``cli``).
OWNER = "owner"


class ClusterError(ReliableMsgError):
    """A Redis Cluster node did not start, or the cluster did not become ``ok`` in time."""


@dataclass
class Node:
    """One ``redis-server`` of the cluster: its port and its directory."""

    port: int
    dir: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    #: Its cluster node id (``CLUSTER MYID``) once the cluster is created: what tells
    #: it from another ``redis-server`` that took its port while it was down.
    id: str | None = None
    #: Whether its last exit was :meth:`kill`'s (else it died on its own).
    killed: bool = False

    @property
    def pidfile(self) -> Path:
        return self.dir / "redis.pid"

    def argv(self) -> list[str]:
        return [
            "redis-server",
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
            # With no replica, a dead master's slots are served by nobody; by default
            # every node then refuses every key ("CLUSTERDOWN"). With this, the other
            # masters go on serving theirs: one dead master stops only its own shards.
            "--cluster-require-full-coverage", "no",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
            "--pidfile", str(self.pidfile),
            "--logfile", str(self.dir / "redis.log"),
        ]  # fmt: skip

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        # A session of its own: a Ctrl-C to the test run does not reach the nodes, which
        # are stopped by destroy() (or by the next cluster, after a crash).
        self.proc = subprocess.Popen(
            self.argv(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        # Before redis-server writes it too: a run killed meanwhile leaves its pid.
        self.pidfile.write_text(f"{self.proc.pid}\n")
        self.killed = False

    def running(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return _redis_pid(self.pidfile) is not None

    def kill(self) -> None:
        """SIGKILL: its data gone with it, as when a machine dies."""
        self.killed = True
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(timeout=10)
        else:
            _kill_by_pidfile(self.pidfile)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2, decode_responses=True)

    def died(self) -> str | None:
        """How it ended if it exited on its own (not by :meth:`kill`): its exit status
        and the end of its log; None while it runs or after :meth:`kill`."""
        if self.killed or self.proc is None or self.proc.poll() is None:
            return None
        return f"redis-server on {self.port} exited ({self.proc.returncode}): {_log_tail(self)}"


class RedisCluster(Cluster):
    """``masters`` Redis masters (and ``replicas`` replicas of each) on loopback ports.

    ``with RedisCluster() as cluster: cluster.url`` starts it and destroys it after.
    """

    def __init__(self, masters: int = 3, replicas: int = 0, *, base: Path | None = None) -> None:
        if masters < 3:
            raise ValueError("a Redis Cluster needs at least 3 masters")
        self.replicas = replicas
        self._count = masters * (1 + replicas)
        self._base = base
        self.dir: Path | None = None
        self.nodes: list[Node] = []
        self._masters: list[Node] = []

    # -- life ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the nodes, join them into a cluster and wait until every node says
        ``cluster_state:ok``."""
        ROOT.mkdir(parents=True, exist_ok=True)
        clean_leftovers()
        if self._base is None:
            self.dir = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=ROOT))
            (self.dir / OWNER).write_text(f"{os.getpid()}\n")
        else:
            self.dir = self._base
            self.dir.mkdir(parents=True, exist_ok=True)
        try:
            ports = cluster_ports(self._count)
            self.nodes = [Node(port, self.dir / str(port)) for port in ports]
            for node in self.nodes:
                node.start()
            for node in self.nodes:
                self._wait_answers(node)
            self._create()
            self._wait_ok()
            self._masters = self._find_masters()
            for node in self.nodes:
                node.id = _myid(node)
        except BaseException:
            self.destroy()
            raise

    def _create(self) -> None:
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        argv = ["redis-cli", "--cluster", "create", *addresses]
        argv += ["--cluster-replicas", str(self.replicas), "--cluster-yes"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise ClusterError(f"redis-cli --cluster create failed:\n{done.stdout}{done.stderr}")

    def kill(self, i: int) -> None:
        """SIGKILL master ``i`` (of :meth:`masters`): its keys are lost."""
        self._masters[i].kill()

    def restart(self, i: int) -> None:
        """Start master ``i`` again on its port and directory: it comes back with its
        slots (from its ``nodes.conf``) and no keys; wait until the cluster is ``ok``
        on every node and none is still marked failed."""
        node = self._masters[i]
        if node.running():
            node.kill()
        node.start()
        self._wait_answers(node)
        self._wait_ok()

    def heal(self) -> None:
        """Restart every node that is not running (a test killed it); wait until ok.
        A node that died on its own is logged with the end of its log."""
        for node in self.nodes:
            if not node.running():
                if ended := node.died():
                    log.warning("healing the Redis Cluster: %s", ended)
                node.start()
                self._wait_answers(node)
        self._wait_ok()

    def stop_all(self) -> None:
        """SIGKILL every node (no data to save); directories kept."""
        for node in self.nodes:
            node.kill()

    def destroy(self) -> None:
        """Every node gone and its directory removed. :class:`ClusterError` if a
        ``redis-server`` of this cluster still runs after. Leftovers of killed runs
        go too."""
        self.stop_all()
        clean_leftovers()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
        if left := self.leftovers():
            raise ClusterError(f"redis-server still running or listening on ports {left}")

    def leftovers(self) -> list[int]:
        """The ports of its nodes that still run or take connections (none after
        :meth:`destroy`)."""
        return [node.port for node in self.nodes if node.running() or port_open(node.port)]

    # -- what it is ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Its ``redis_url``: every node as a seed."""
        seeds = ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)
        return f"redis+cluster://{seeds}/0"

    def masters(self) -> list[tuple[str, int]]:
        """(host, port) of each master, as created; :meth:`kill` takes an index here."""
        return [("127.0.0.1", node.port) for node in self._masters]

    def master_of(self, key: str) -> int:
        """The index (in :meth:`masters`) of the master whose slots hold ``key``."""
        node = next(node for node in self.nodes if node.running())
        with node.client() as client:
            slot = int(client.cluster("KEYSLOT", key))
            table = client.cluster("NODES")
        for address, entry in table.items():
            if any(int(r[0]) <= slot <= int(r[-1]) for r in entry["slots"]):
                port = int(address.rsplit(":", 1)[1])
                return [node.port for node in self._masters].index(port)
        raise ClusterError(f"no master serves slot {slot}")

    def pids(self) -> list[int]:
        """The pids of the nodes running now."""
        return [n.proc.pid for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    def states(self) -> dict[int, str]:
        """``cluster_state`` of each node by port (``down`` when it does not answer)."""
        return {node.port: _cluster_state(node) for node in self.nodes}

    # -- waiting --------------------------------------------------------------------------------

    def _wait_answers(self, node: Node) -> None:
        """Wait until ``node`` answers, and it is ours: its process still runs and, once
        the cluster is made, it has its node id. Another ``redis-server`` that took its
        port while it was down (a cluster of another test run) answers a ping too; ours
        then exits on "Address already in use"."""
        deadline = time.monotonic() + READY_WITHIN
        while not _pings(node):
            if not node.running():
                raise ClusterError(f"redis-server on {node.port} exited: {_log_tail(node)}")
            if time.monotonic() > deadline:
                raise ClusterError(f"redis-server on {node.port} does not answer")
            time.sleep(0.05)
        if node.id is not None and (other := _myid(node)) != node.id:
            raise ClusterError(
                f"port {node.port} is answered by another redis-server (id {other!r}, not"
                f" {node.id}): {node.died() or 'ours still starting'}"
            )
        if not node.running():
            raise ClusterError(f"redis-server on {node.port} exited: {_log_tail(node)}")

    def _wait_ok(self) -> None:
        deadline = time.monotonic() + READY_WITHIN
        while not all(self._healthy(node) for node in self.nodes):
            if time.monotonic() > deadline:
                states = self.states()
                raise ClusterError(f"the cluster is not ok after {READY_WITHIN:.0f} s: {states}")
            time.sleep(0.1)
        if ended := self.died():
            raise ClusterError("; ".join(ended))

    def died(self) -> list[str]:
        """How each node that exited on its own (not killed by the harness) ended."""
        return [e for node in self.nodes if (e := node.died())]

    def _healthy(self, node: Node) -> bool:
        """``ok``, every node known and none marked failed (a restarted master is
        cleared of its ``fail`` flag some node timeouts after it answers again)."""
        try:
            with node.client() as client:
                info = client.cluster("INFO")
                table = client.cluster("NODES")
        except redis.RedisError:
            return False
        return (
            info.get("cluster_state") == "ok"
            and len(table) == len(self.nodes)
            and not any("fail" in entry["flags"] for entry in table.values())
        )

    def _find_masters(self) -> list[Node]:
        by_port = {node.port: node for node in self.nodes}
        with self.nodes[0].client() as client:
            table = client.cluster("NODES")
        # Keys are "host:port" (redis-py drops the "@bus" part); flags "myself,master".
        ports = [
            int(address.rsplit(":", 1)[1])
            for address, entry in table.items()
            if "master" in entry["flags"].split(",")
        ]
        return [by_port[port] for port in sorted(ports)]


# -- ports ---------------------------------------------------------------------------------------


def cluster_ports(count: int) -> list[int]:
    """``count`` ports whose cluster bus port (+10000) is free too, none of them 6379."""
    ports = paired_ports(count, BUS_OFFSET, PORT_RANGE, avoid=MACHINE_REDIS_PORT)
    if ports is None:
        raise ClusterError(f"no {count} free port pairs in {PORT_RANGE}")
    return ports


# -- leftovers of runs that were killed ----------------------------------------------------------


def clean_leftovers() -> None:
    """Kill the nodes and remove the directories of clusters whose owner process is gone
    (a test run killed before its teardown). The CLI's cluster is left to ``down``."""
    if not ROOT.is_dir():
        return
    for path in ROOT.iterdir():
        owner = _owner(path)
        if owner == "cli" or (owner.isdigit() and alive(int(owner))):
            continue
        if path.is_dir():
            _remove(path)


def _owner(path: Path) -> str:
    """The owner of a cluster's directory: its owner file, else the pid its name starts
    with (``<pid>-...``): a directory just made by ``mkdtemp`` has no owner file yet,
    and another process cleaning then must not take it for a leftover."""
    return read(path / OWNER) or path.name.split("-", 1)[0]


def _remove(path: Path) -> None:
    for pidfile in path.glob("*/redis.pid"):
        _kill_by_pidfile(pidfile)
    shutil.rmtree(path, ignore_errors=True)


def _kill_by_pidfile(pidfile: Path) -> None:
    if (pid := _redis_pid(pidfile)) is not None:
        kill_all(lambda: [pid] if running(pid) else [])


def _redis_pid(pidfile: Path) -> int | None:
    return pid_in(pidfile, b"redis-server")


def _pings(node: Node) -> bool:
    try:
        with node.client() as client:
            return bool(client.ping())
    except redis.RedisError:
        return False


def _myid(node: Node) -> str | None:
    """The cluster node id of whatever answers on the node's port (None if nothing,
    or not a cluster node)."""
    try:
        with node.client() as client:
            return str(client.cluster("MYID"))
    except redis.RedisError:
        return None


def _cluster_state(node: Node) -> str:
    try:
        with node.client() as client:
            return str(client.cluster("INFO").get("cluster_state", "?"))
    except redis.RedisError:
        return "down"


def _log_tail(node: Node) -> str:
    return "\n".join(read(node.dir / "redis.log").splitlines()[-10:])


# -- the command line ------------------------------------------------------------------------------

#: The CLI's one cluster.
CLI_DIR = ROOT / "cli"


def _cli_nodes() -> list[Node]:
    return [Node(int(p.parent.name), p.parent) for p in sorted(CLI_DIR.glob("*/redis.pid"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reliable_msg.harness.redis_cluster")
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--masters", type=int, default=3)
    parser.add_argument("--replicas", type=int, default=0)
    args = parser.parse_args(argv)
    if args.action == "up":
        if any(node.running() for node in _cli_nodes()):
            print("a cluster is up already: down first", file=sys.stderr)
            return 1
        shutil.rmtree(CLI_DIR, ignore_errors=True)
        CLI_DIR.mkdir(parents=True)
        (CLI_DIR / OWNER).write_text("cli\n")
        cluster = RedisCluster(args.masters, args.replicas, base=CLI_DIR)
        cluster.start()
        for node in cluster.nodes:
            node.proc = None  # they outlive this process; found again by their pid files
        print(cluster.url)
        return 0
    if args.action == "down":
        _remove(CLI_DIR)
        return 0
    nodes = _cli_nodes()
    for node in nodes:
        print(f"127.0.0.1:{node.port} {_cluster_state(node)}")
    return 0 if nodes and all(_cluster_state(node) == "ok" for node in nodes) else 1


if __name__ == "__main__":
    sys.exit(main())
