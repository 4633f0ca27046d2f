"""The demo and the soak give each of their listeners a port of its own: ports picked
one by one, each released before the next pick, can come back twice (the soak's order
service once got the RabbitMQ fault proxy's port and could never start)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from soak.options import parse
from soak.runner import Run


def test_the_soak_gives_every_listener_its_own_port(tmp_path: Path) -> None:
    for _ in range(20):
        run = Run(parse(["--run-dir", str(tmp_path)]), Console(quiet=True))
        ports = [
            run.order_port,
            *run.instance_ports,
            run.rabbit_proxy.port,
            run.balancer.port,
            *(party.port for party in run.tcc.parties),
            *(party.proxy.port for party in run.tcc.parties),
        ]
        assert len(run.tcc.parties) == 3
        assert 0 not in ports
        assert len(set(ports)) == len(ports), ports
