"""Where the processes of a bench run spend their CPU, from a py-spy profile of it.

::

    py-spy record --subprocesses --nonblocking --rate 100 --format raw -o paths.txt -- \\
        .venv/bin/reliable-msg bench --parts paths --paths single --messages 3000
    python -m reliable_msg.tools.bench.profile paths.txt

prints, per process role (service, consumer, producers, and for TCC the initiator and
the participants), the share of samples whose innermost Python frame is in each library,
and the functions with the most samples of their own. Time in a C or Cython extension
(asyncpg's protocol, uvloop, httptools) and in the system calls it makes is counted to
the Python frame that called into it.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

#: py-spy's frame: ``function (file:line)``; with --subprocesses each stack starts with
#: one ``process PID:"command line"`` frame per process from the root down.
FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")
PROCESS = re.compile(r'^process \d+:"(?P<command>.*)"$')

#: Libraries by the path of their files, in the order they are tried.
SUBSYSTEMS = [
    ("asyncpg", ("asyncpg/",)),
    (
        "HTTP server (uvicorn, Starlette, FastAPI, pydantic)",
        ("uvicorn/", "starlette/", "fastapi/", "pydantic"),
    ),
    ("HTTP client (aiohttp, tenacity)", ("aiohttp/", "yarl/", "multidict/", "tenacity/")),
    ("AMQP (aio-pika, aiormq, pamqp)", ("aio_pika/", "aiormq/", "pamqp/")),
    ("event loop (uvloop, asyncio)", ("asyncio/", "uvloop/")),
    ("reliable_msg", ("reliable_msg/",)),
    ("JSON, Prometheus, logging, Redis", ("json/", "prometheus_client/", "logging/", "redis/")),
]
OTHER = "other (stdlib, contextlib, dataclasses)"


@dataclass
class Role:
    """The samples of the processes of one role."""

    samples: int = 0
    subsystems: Counter[str] = field(default_factory=Counter)
    functions: Counter[str] = field(default_factory=Counter)


def role_of(command: str) -> str:
    if "reliable_msg.tools.bench.worker consume" in command:
        return "consumer"
    if "reliable_msg.tools.bench.worker produce" in command:
        return "producers"
    if "reliable_msg.tools.bench.worker initiate" in command:
        return "initiator"
    if "reliable_msg.harness.tcc_party" in command:
        return "participants"
    if " serve" in command:
        return "service"
    return "bench driver"


def subsystem_of(file: str) -> str:
    for name, markers in SUBSYSTEMS:
        if any(m in file for m in markers):
            return name
    return OTHER


def read(path: Path) -> dict[str, Role]:
    roles: dict[str, Role] = {}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        command, frames = "", []
        for raw in stack.split(";"):
            process = PROCESS.match(raw)
            if process:
                command = process["command"]
            else:
                frames.append(raw)
        if not frames or any(f.startswith("_find_and_load ") for f in frames):
            continue  # imports at start-up
        leaf = FRAME.match(frames[-1])
        function, file = (leaf["function"], leaf["file"]) if leaf else (frames[-1], "")
        role = roles.setdefault(role_of(command), Role())
        role.samples += int(count)
        role.subsystems[subsystem_of(file)] += int(count)
        role.functions[f"{function} ({file})"] += int(count)
    return roles


def report(roles: dict[str, Role], top: int) -> str:
    shown = [
        r for r in ("service", "consumer", "producers", "participants", "initiator") if r in roles
    ]
    lines = ["| innermost frame in | " + " | ".join(shown) + " |"]
    lines.append("|---|" + "---:|" * len(shown))
    for name in [n for n, _ in SUBSYSTEMS] + [OTHER]:
        shares = [roles[r].subsystems[name] / roles[r].samples for r in shown]
        lines.append(f"| {name} | " + " | ".join(f"{s:.0%}" for s in shares) + " |")
    lines.append("| samples | " + " | ".join(str(roles[r].samples) for r in shown) + " |")
    for r in shown:
        lines += ["", f"| {r}: function (own samples) | share |", "|---|---:|"]
        for function, count in roles[r].functions.most_common(top):
            lines.append(f"| `{function}` | {count / roles[r].samples:.1%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("profile", type=Path, help="py-spy record --format raw output")
    parser.add_argument("--top", type=int, default=10, help="functions listed per role")
    args = parser.parse_args()
    print(report(read(args.profile), args.top))


if __name__ == "__main__":
    main()
