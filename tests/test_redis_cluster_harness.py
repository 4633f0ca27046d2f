"""The Redis Cluster the tests start: a killed master takes only its own slots away and
comes back with them, empty; nothing of a cluster outlives its test run, not even of a
run that was killed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import redis
from redis.cluster import RedisCluster as ClusterClient

from reliable_msg.harness.ports import port_open
from reliable_msg.harness.redis_cluster import ROOT, RedisCluster, clean_leftovers


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
