"""The Redis Cluster the tests start: a killed master takes only its own slots away and
comes back with them, empty; nothing of a cluster outlives its test run, not even of a
run that was killed."""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster as ClusterClient

from reliable_msg.errors import FallbackUnavailable
from reliable_msg.harness.ports import port_open
from reliable_msg.harness.redis_cluster import ROOT, ClusterError, RedisCluster, clean_leftovers
from reliable_msg.transports.redis import delete_namespace


def keys_on_each_master(cluster: RedisCluster) -> dict[int, str]:
    """A key served by each master, by its port."""
    found: dict[int, str] = {}
    masters = cluster.masters()
    for n in range(1000):
        key = f"rmsgtest.key{n}"
        found.setdefault(masters[cluster.master_of(key)][1], key)
        if len(found) == len(masters):
            return found
    raise AssertionError("no key for every master in 1,000")


def test_a_killed_master_stops_only_its_slots_and_returns_with_them_empty(
    redis_cluster: RedisCluster,
) -> None:
    host, port = redis_cluster.masters()[0]
    with ClusterClient(host=host, port=port, decode_responses=True) as client:
        keys = keys_on_each_master(redis_cluster)
        for key in keys.values():
            client.set(key, "v")
        killed = redis_cluster.masters()[1][1]
        redis_cluster.kill(1)
        with redis.Redis(port=port, decode_responses=True) as other:
            assert other.cluster("INFO")["cluster_state"] == "ok"
        for master, key in keys.items():
            if master != killed:
                assert client.get(key) == "v"
        redis_cluster.restart(1)
        assert redis_cluster.masters()[1][1] == killed
        assert client.get(keys[killed]) is None
        assert redis_cluster.masters()[redis_cluster.master_of(keys[killed])][1] == killed
        for master, key in keys.items():
            if master != killed:
                assert client.get(key) == "v"
            client.delete(key)


START_AND_DIE = """
import os
from reliable_msg.harness.redis_cluster import RedisCluster
cluster = RedisCluster()
cluster.start()
print(cluster.dir, *[port for _, port in cluster.masters()], flush=True)
os._exit(0)
"""


def test_the_nodes_of_a_run_killed_before_its_teardown_are_removed_by_the_next() -> None:
    argv = [sys.executable, "-c", START_AND_DIE]
    started = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    where, *ports = started.stdout.split()
    assert Path(where).parent == ROOT
    assert all(port_open(int(port)) for port in ports)
    clean_leftovers()
    assert not Path(where).exists()
    assert not any(port_open(int(port)) for port in ports)


def test_destroy_leaves_no_process_and_no_directory() -> None:
    cluster = RedisCluster()
    with cluster:
        pids = cluster.pids()
        assert len(pids) == 3
        assert cluster.dir is not None and cluster.dir.is_dir()
    assert cluster.leftovers() == []
    assert not cluster.dir.exists()
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)


def test_a_restarted_master_whose_port_another_redis_took_is_an_error_at_once(
    redis_cluster: RedisCluster, tmp_path: Path
) -> None:
    # A cluster of another test run may take the port of a master while it is down: the
    # restart must not take that server's answers for its own (it did, and the test
    # went on talking to another run's cluster until that one was destroyed).
    port = redis_cluster.masters()[2][1]
    redis_cluster.kill(2)
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    other = subprocess.Popen([*argv, "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not port_open(port) and time.monotonic() < deadline:
            time.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(ClusterError, match="another redis-server"):
            redis_cluster.restart(2)
        assert time.monotonic() - started < 10
    finally:
        other.kill()
        other.wait()
    redis_cluster.heal()
    assert all(state == "ok" for state in redis_cluster.states().values())


def test_a_stale_pid_file_never_kills_another_clusters_node(redis_cluster: RedisCluster) -> None:
    # Pids come round within minutes here (pid_max 32768): the pid file of a killed run's
    # node may name a live node of another cluster by now.
    live = redis_cluster.pids()[0]
    leftover = ROOT / "999999-leftover"  # an owner pid above pid_max: gone
    (leftover / "20000").mkdir(parents=True)
    (leftover / "20000" / "redis.pid").write_text(f"{live}\n")
    clean_leftovers()
    assert not leftover.exists()
    assert Path(f"/proc/{live}").exists(), "a node of a live cluster was killed"
    assert live in redis_cluster.pids()


def test_a_directory_being_made_is_no_leftover() -> None:
    # mkdtemp, then the owner file: another process cleaning in between read no owner.
    made = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=ROOT))
    try:
        clean_leftovers()
        assert made.is_dir()
    finally:
        shutil.rmtree(made)


async def test_deleting_a_namespace_with_a_master_down_leaves_no_connection_open(
    redis_cluster: RedisCluster,
) -> None:
    # redis-py's cluster client, one master refusing a SCAN, left the other masters'
    # connections open: "loop is closed" ResourceWarnings failed whatever test came next.
    redis_cluster.kill(0)
    before = set(asyncio.all_tasks())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(FallbackUnavailable):
            await delete_namespace(redis_cluster.url, "rmsg-test-gone")
        gc.collect()
    assert set(asyncio.all_tasks()) <= before | {asyncio.current_task()}
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
