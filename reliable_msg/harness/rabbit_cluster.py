"""A RabbitMQ cluster of this machine's own: three nodes (by default) started on loopback
ports beside the machine's node, clustered, killed, restarted and removed again.

    python -m reliable_msg.harness.rabbit_cluster up|down|status

Each node has its own node name, AMQP and distribution ports, configuration file,
``rabbitmq-env.conf``, empty plugin list, and data, log and pid files under one
directory owned by the ``rabbitmq`` user; it runs as that user with the machine's
Erlang cookie. Nothing of ``/etc/rabbitmq`` reaches it: the machine's node
(``rabbit@localhost`` on 5672) is never joined, stopped or otherwise touched, and every
``rabbitmqctl`` here names one of our nodes with ``-n``.

A cluster belongs to its owner's process: leftovers of an owner that died (a test run
killed half-way) are killed and removed by the next :meth:`RabbitCluster.start` and by
``down``. The command line's cluster belongs to ``cli``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reliable_msg.errors import ReliableMsgError

from .leftovers import Cluster, cmdline, kill_all
from .ports import free_ports, port_open

#: Where every cluster keeps its nodes' files: ``<BASE>/<owner>/node-<i>``.
BASE = Path(os.environ.get("RMSG_RABBIT_CLUSTER_DIR", "/tmp/rmsg-rabbit-cluster"))
#: The user the nodes run as, and its home, which holds the machine's Erlang cookie.
USER = "rabbitmq"
HOME = "/var/lib/rabbitmq"
SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
CTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"
#: The machine's own node: never one of ours.
MACHINE_NODE = "rabbit@localhost"
#: The mark on the command line of our nodes' Erlang VMs (followed by the owner's
#: directory), by which leftovers are found.
MARK = "-rmsg_cluster"
#: Ports a RabbitMQ tool may take for itself (the CLI's distribution range among them).
RESERVED = {4369, 5672, 15672, 25672, *range(35672, 35683)}
#: Seconds a node gets to boot, a ``rabbitmqctl`` command to answer, a node to stop.
BOOT = 120.0
CTL_TIMEOUT = 120.0
CLI_OWNER = "cli"


class ClusterError(ReliableMsgError):
    """A node did not start, join or stop as asked."""


@dataclass
class Node:
    """One node of the cluster, with its ports and its directory."""

    index: int
    name: str
    amqp_port: int
    dist_port: int
    dir: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"

    @property
    def pid_file(self) -> Path:
        return self.dir / "rabbitmq.pid"

    @property
    def log_dir(self) -> Path:
        return self.dir / "log"

    def vm_pid(self) -> int | None:
        """The OS pid of the node's Erlang VM (``beam.smp``) while it runs; None if not."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _marked(pid, self.dir.parent) else None

    def env(self) -> dict[str, str]:
        """The node's whole environment: nothing of this process's, nothing of
        ``/etc/rabbitmq``."""
        d = self.dir
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": HOME,
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_CONFIG_FILES": str(d / "conf.d"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.log_dir),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(d / "plugins-expand"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": f"{MARK} {d.parent}",
        }

    def write_files(self) -> None:
        """The node's directory and its own configuration, owned by ``rabbitmq``."""
        for sub in ("mnesia", "log", "conf.d"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.amqp_port}\n"
            "loopback_users.guest = true\n"
            "log.console = false\n"
            "log.file.level = info\n"
            "disk_free_limit.absolute = 50MB\n"
        )
        (self.dir / "rabbitmq-env.conf").write_text(
            "ERL_EPMD_ADDRESS=127.0.0.1\n"
            'export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"\n'
        )
        (self.dir / "enabled_plugins").write_text("[].\n")
        _chown_tree(self.dir.parent)

    def spawn(self) -> None:
        """Start the node's VM in the background (as ``rabbitmq``); :meth:`wait_booted`."""
        out = (self.log_dir / "stdout.log").open("ab")
        with out:
            self.proc = subprocess.Popen(
                [SERVER],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env(),
                cwd=self.dir,
                start_new_session=True,
                **_as_rabbitmq(),
            )

    def boot(self) -> None:
        """Start the node and wait until it takes AMQP connections."""
        self.spawn()
        self.wait_booted()

    def wait_booted(self, within: float = BOOT) -> None:
        """Until its AMQP port takes connections; :class:`ClusterError` if the node dies
        or takes longer than ``within`` seconds."""
        deadline = time.monotonic() + within
        while not port_open(self.amqp_port):
            if self.proc is not None and self.proc.poll() is not None:
                raise ClusterError(f"node {self.name} exited at boot:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise ClusterError(f"node {self.name} not up in {within:.0f} s:\n{self.log_tail()}")
            time.sleep(0.2)

    def ctl(self, *args: str, timeout: float = CTL_TIMEOUT, check: bool = True) -> str:
        """``rabbitmqctl -n <this node> args``: its output."""
        if self.name == MACHINE_NODE:  # pragma: no cover - a guard, never taken
            raise ClusterError("refusing to touch the machine's own node")
        done = subprocess.run(
            [CTL, "-n", self.name, *args],
            capture_output=True,
            text=True,
            env=self.env(),
            cwd=self.dir,
            timeout=timeout,
            check=False,
            **_as_rabbitmq(),
        )
        if check and done.returncode != 0:
            raise ClusterError(
                f"rabbitmqctl -n {self.name} {' '.join(args)}: {done.stdout}{done.stderr}"
            )
        return str(done.stdout)

    def stop(self) -> None:
        """``rabbitmqctl stop``: the node shuts down, its data kept."""
        self.ctl("stop")
        self.reap(30.0)

    def kill(self) -> None:
        """SIGKILL to the node's VM; return once it is gone and its port closed."""
        pid = self.vm_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.reap(10.0)

    def reap(self, within: float) -> None:
        """Wait for the node's start script to exit (after its VM did)."""
        if self.proc is not None:
            try:
                self.proc.wait(timeout=within)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        deadline = time.monotonic() + within
        while port_open(self.amqp_port) and time.monotonic() < deadline:
            time.sleep(0.05)

    def log_tail(self, lines: int = 20) -> str:
        logs = sorted(self.log_dir.glob("*.log"))
        text = "\n".join(p.read_text(errors="replace") for p in logs if p.is_file())
        return "\n".join(text.splitlines()[-lines:])


class RabbitCluster(Cluster):
    """``size`` RabbitMQ nodes of ``owner`` (by default this process) on loopback,
    clustered by :meth:`start`, removed by :meth:`destroy` (also as a context manager)."""

    def __init__(self, size: int = 3, *, owner: str | None = None, base: Path = BASE) -> None:
        self.owner = owner or str(os.getpid())
        self.dir = base / self.owner
        ports = _ports(2 * size)
        self.nodes = [
            Node(
                index=i,
                name=f"rmsg-cluster-{self.owner}-{i + 1}@localhost",
                amqp_port=ports[2 * i],
                dist_port=ports[2 * i + 1],
                dir=self.dir / f"node-{i + 1}",
            )
            for i in range(size)
        ]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def start(self) -> None:
        """Remove leftovers, start every node at once, join the others to the first in
        turn, and wait until the cluster reports them all running."""
        remove_leftovers(self.dir.parent)
        remove_owner(self.dir)
        for node in self.nodes:
            node.write_files()
        self._each(Node.boot)
        first, *others = self.nodes
        for node in others:  # one at a time: two joining at once can fail mnesia's start
            _join(node, first)
        self.wait_running(list(range(len(self.nodes))))

    def kill(self, i: int) -> None:
        """SIGKILL to node ``i``'s Erlang VM."""
        self.nodes[i].kill()

    def restart(self, i: int) -> None:
        """Start node ``i`` again (it rejoins by itself); wait until the cluster reports
        it running."""
        self.nodes[i].boot()
        self.wait_running([i])

    def stop_all(self) -> None:
        """Every node stopped (``rabbitmqctl stop``), its data kept."""
        self._each(Node.stop)

    def start_all(self) -> None:
        """Every node started again at once (each waits for its peers), then running."""
        self._each(Node.boot)
        self.wait_running(list(range(len(self.nodes))))

    def destroy(self) -> None:
        """Every node killed, every file removed; safe to call twice."""
        for node in self.nodes:
            node.kill()
        remove_owner(self.dir)

    def running_nodes(self, asking: int | None = None) -> list[str]:
        """The running nodes the cluster reports, asked of node ``asking`` (by default
        the first whose port answers)."""
        ask = self.nodes[asking] if asking is not None else self._answering()
        status = json.loads(ask.ctl("cluster_status", "--formatter", "json"))
        return sorted(status.get("running_nodes", []))

    def queue(self, name: str) -> dict[str, Any]:
        """What the cluster says of queue ``name``: its ``type``, ``members``, ``online``
        members and ``leader`` (the last three for a quorum queue); {} if there is none."""
        listed = self._answering().ctl(
            "list_queues", "name", "type", "members", "online", "leader", "--formatter", "json"
        )
        found = [q for q in json.loads(listed or "[]") if q.get("name") == name]
        return dict(found[0]) if found else {}

    def index_of(self, node_name: str) -> int:
        """The index of the node named ``node_name``."""
        return next(n.index for n in self.nodes if n.name == node_name)

    def wait_running(self, indexes: list[int], within: float = BOOT) -> None:
        """Until the cluster reports nodes ``indexes`` running."""
        wanted = {self.nodes[i].name for i in indexes}
        deadline = time.monotonic() + within
        seen: list[str] = []
        while True:
            with contextlib.suppress(ClusterError, subprocess.TimeoutExpired):
                seen = self.running_nodes()
                if wanted <= set(seen):
                    return
            if time.monotonic() > deadline:
                raise ClusterError(f"{sorted(wanted)} not running after {within:.0f} s: {seen}")
            time.sleep(0.5)

    def _answering(self) -> Node:
        for node in self.nodes:
            if port_open(node.amqp_port):
                return node
        raise ClusterError("no node of the cluster answers")

    def _each(self, act: Callable[[Node], object], nodes: list[Node] | None = None) -> None:
        """``act(node)`` for every node at once; the first error comes out."""
        nodes = self.nodes if nodes is None else nodes
        with ThreadPoolExecutor(max_workers=max(1, len(nodes))) as pool:
            for future in [pool.submit(act, node) for node in nodes]:
                future.result()


def _join(node: Node, first: Node) -> None:
    node.ctl("stop_app")
    node.ctl("join_cluster", first.name)
    node.ctl("start_app")


def _ports(count: int) -> list[int]:
    while True:
        ports = free_ports(count + len(RESERVED))
        chosen = [p for p in ports if p not in RESERVED][:count]
        if len(chosen) == count:
            return chosen


def _as_rabbitmq() -> dict[str, Any]:
    """Popen's options that run a command as ``rabbitmq`` (we are root)."""
    if os.geteuid() == 0:
        return {"user": USER, "group": USER, "extra_groups": []}
    return {}


def _chown_tree(path: Path) -> None:
    if os.geteuid() != 0:
        return
    shutil.chown(path, USER, USER)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            shutil.chown(os.path.join(root, name), USER, USER)


def _marked(pid: int, under: Path) -> bool:
    """Whether ``pid`` is the VM of one of our nodes kept under ``under`` (an owner's
    directory) or anywhere below it."""
    argv = cmdline(pid)
    for i, arg in enumerate(argv[:-1]):
        if arg == MARK.encode() and (
            argv[i + 1] == bytes(under) or argv[i + 1].startswith(bytes(under) + b"/")
        ):
            return True
    return False


def _vms(under: Path) -> list[int]:
    """The pids of our nodes' VMs under ``under``."""
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    return [pid for pid in pids if _marked(pid, under)]


def remove_owner(owner_dir: Path) -> None:
    """Kill an owner's VMs and remove its directory."""
    kill_all(lambda: _vms(owner_dir))
    shutil.rmtree(owner_dir, ignore_errors=True)


def remove_leftovers(base: Path = BASE) -> list[str]:
    """Remove the clusters of owners that died (a number whose process is gone); the
    owners removed."""
    if not base.is_dir():
        return []
    gone = [d for d in base.iterdir() if d.name.isdigit() and not Path(f"/proc/{d.name}").exists()]
    for owner_dir in gone:
        remove_owner(owner_dir)
    return [d.name for d in gone]


@contextlib.contextmanager
def cluster(size: int = 3) -> Iterator[RabbitCluster]:
    """A started cluster of this process, destroyed after the block."""
    with RabbitCluster(size) as c:
        yield c


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reliable_msg.harness.rabbit_cluster")
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--size", type=int, default=3)
    args = parser.parse_args(argv)
    owner_dir = BASE / CLI_OWNER
    if args.action == "up":
        c = RabbitCluster(args.size, owner=CLI_OWNER)
        started = time.monotonic()
        try:
            c.start()
        except BaseException:
            c.destroy()
            raise
        print(f"# {args.size} nodes up in {time.monotonic() - started:.1f} s", file=sys.stderr)
        print(",".join(c.urls))
        (owner_dir / "urls").write_text("\n".join(c.urls) + "\n")
    elif args.action == "down":
        removed = remove_leftovers()
        remove_owner(owner_dir)
        print(f"removed the cli cluster and leftovers of {removed or 'no dead run'}")
    else:
        urls = owner_dir / "urls"
        print(urls.read_text().strip() if urls.exists() else "no cli cluster")
        running = {d.name: len(_vms(d)) for d in BASE.iterdir()} if BASE.is_dir() else {}
        print(f"node VMs by owner: {running}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
