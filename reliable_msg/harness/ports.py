"""Free localhost ports for the processes and servers a tool starts, and whether a port
takes connections."""

from __future__ import annotations

import contextlib
import random
import socket


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: each socket stays bound until all are picked, so
    the kernel cannot hand the same port out twice."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]


def free_port() -> int:
    """One free port."""
    return free_ports(1)[0]


def port_open(port: int, host: str = "127.0.0.1", *, timeout: float = 0.5) -> bool:
    """Whether something takes TCP connections on ``host``:``port`` now."""
    with socket.socket() as s:
        s.settimeout(timeout)
        return s.connect_ex((host, port)) == 0


def paired_ports(
    count: int, offset: int, within: tuple[int, int], *, avoid: int
) -> list[int] | None:
    """``count`` ports of range ``within``, in a random order, each free together with
    the port ``offset`` above it, and neither of them ``avoid``; None if there are not
    so many. Every socket stays bound until all are picked, so none is handed out twice."""
    with contextlib.ExitStack() as stack:
        picked: list[int] = []
        candidates = list(range(*within))
        random.shuffle(candidates)
        for port in candidates:
            if avoid in (port, port + offset):
                continue
            held = [_bind(stack, port), _bind(stack, port + offset)]
            if all(held):
                picked.append(port)
                if len(picked) == count:
                    return picked
        return None


def _bind(stack: contextlib.ExitStack, port: int) -> bool:
    s = stack.enter_context(socket.socket())
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        return False
    return True
