"""The files under ``deploy/`` are well-formed and name only things that exist: CLI
commands and options, Python modules, HTTP paths, settings, files. (No Docker engine
here: nothing is built or run.)"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast
from urllib.parse import urlsplit

import pytest
import yaml
from click.testing import CliRunner
from starlette.routing import Match

from reliable_msg.service.api import create_app
from reliable_msg.service.runtime import Runtime
from reliable_msg.service.settings import Settings, load_settings
from reliable_msg.tools.cli import main
from reliable_msg.transports.nodes import where
from reliable_msg.transports.redis_client import is_cluster_url, parse_cluster_url

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
IMAGE = "reliable-msg:0.1.0"
#: Placeholders that stand for tokens in the templates.
PLACEHOLDER = re.compile(r"REPLACE-ME|\$\{[A-Z_]+:\?[^}]*\}")


class Routes:
    """Which GET paths the service's app answers (routing only; nothing is called)."""

    def __init__(self) -> None:
        self._app = create_app(cast(Runtime, SimpleNamespace(settings=load_settings(None))))

    def __contains__(self, path: object) -> bool:
        scope = {"type": "http", "method": "GET", "path": path, "root_path": "", "headers": []}
        return any(r.matches(scope)[0] is Match.FULL for r in self._app.router.routes)


def app_paths() -> Routes:
    routes = Routes()
    assert "/no-such-path" not in routes
    return routes


def assert_cli(args: list[str]) -> None:
    """``reliable-msg ARGS`` names an existing command with existing options."""
    result = CliRunner().invoke(main, [*args, "--help"])
    assert result.exit_code == 0, f"reliable-msg {' '.join(args)}: {result.output}"


def assert_module_command(args: list[str]) -> None:
    """``python -m MODULE ARGS``: the module runs as a program and takes these options."""
    assert args[:2] == ["python", "-m"], args
    module = args[2]
    assert importlib.util.find_spec(f"{module}.__main__") is not None, module
    for arg in args[3:]:
        if arg.startswith("--"):
            assert arg in usage(module), f"{module} has no option {arg}"


@functools.cache
def usage(module: str) -> str:
    """What ``python -m MODULE --help`` prints."""
    result = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def env_settings(monkeypatch: pytest.MonkeyPatch, config: Path, env: dict[str, str]) -> Settings:
    """The settings an instance gets from ``config`` and ``env``, each token made unique."""
    for i, (name, value) in enumerate(env.items()):
        if name.startswith("RMSG_") and name != "RMSG_CONFIG":
            monkeypatch.setenv(name, PLACEHOLDER.sub(f"token-{i}", str(value)))
    return load_settings(config)


# -- the example configuration -----------------------------------------------------------


def test_example_config_lists_every_setting_and_loads() -> None:
    path = DEPLOY / "config.example.toml"
    text = path.read_text()
    settings = load_settings(path)
    assert set(settings.groups) == {"inventory", "credit", "wms"}

    def fields(model: type[Any]) -> list[tuple[str, type[Any] | None]]:
        return [(n, f.annotation) for n, f in model.model_fields.items()]

    sections = {n for n, a in fields(Settings) if hasattr(a, "model_fields")}
    assert {"checkback", "redelivery", "scanner", "fallback", "monitor", "dashboard", "tcc"} <= (
        sections
    )
    for name, annotation in fields(Settings):
        if name in {"producers", "groups", "participants", "admin_token"}:
            continue
        if name in sections:
            assert f"[{name}]" in text, f"section [{name}] missing"
            for sub, _ in fields(cast(type[Any], annotation)):
                assert re.search(rf"^#? ?{sub} =", text, re.M), f"{name}.{sub} missing"
        else:
            assert re.search(rf"^{name} =", text, re.M), f"{name} missing"


# -- Dockerfile --------------------------------------------------------------------------


def dockerfile() -> dict[str, list[str]]:
    """Instructions of deploy/Dockerfile (continuation lines joined): name -> arguments."""
    joined = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    found: dict[str, list[str]] = {}
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, rest = line.partition(" ")
            found.setdefault(name.upper(), []).append(rest.strip())
    return found


def test_dockerfile_installs_the_package_and_runs_existing_commands() -> None:
    steps = dockerfile()
    assert steps["FROM"] == ["python:3.11-slim"]
    for copy in steps["COPY"]:
        for source in copy.split()[:-1]:
            assert (ROOT / source).exists(), f"COPY {source}: no such file"
    assert any("pip install ." in run for run in steps["RUN"])
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    [entrypoint] = [json.loads(e) for e in steps["ENTRYPOINT"]]
    [command] = [json.loads(c) for c in steps["CMD"]]
    assert entrypoint == ["reliable-msg"] and "reliable-msg" in scripts
    assert_cli(command)
    [healthcheck] = steps["HEALTHCHECK"]
    assert "/healthz" in healthcheck and "/healthz" in app_paths()


# -- docker compose ----------------------------------------------------------------------

#: The system on one RabbitMQ node and one Redis, and on a RabbitMQ cluster and a Redis Cluster.
COMPOSE_FILES = ["docker-compose.yml", "docker-compose.cluster.yml"]
CLUSTER = "docker-compose.cluster.yml"
#: What every compose file runs besides RabbitMQ and Redis.
APP_SERVICES = {"postgres", "migrate", "rmsg-1", "rmsg-2", "order", "inventory", "credit", "wms"}


def compose(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / name).read_text())
    return data


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """The service's volumes: where each is mounted -> its source."""
    return {v.split(":")[1]: v.split(":")[0] for v in service.get("volumes", [])}


def rabbit_nodes(services: dict[str, Any]) -> dict[str, str]:
    """The RabbitMQ services: name -> host name (its node is rabbit@<host name>)."""
    return {
        name: s.get("hostname", name)
        for name, s in services.items()
        if s["image"].startswith("rabbitmq:")
    }


def redis_nodes(services: dict[str, Any]) -> list[str]:
    """The services running a Redis server."""
    return [
        name
        for name, s in services.items()
        if s["image"].startswith("redis:")
        and s.get("command", ["redis-server"])[0] == "redis-server"
    ]


def redis_hosts(url: str) -> list[str]:
    """host:port of each node a ``redis_url`` names (``redis://`` or ``redis+cluster://``)."""
    if is_cluster_url(url):
        return [f"{host}:{port}" for host, port in parse_cluster_url(url).nodes]
    return [urlsplit(url).netloc.rpartition("@")[2]]


def conf_lines(path: Path) -> list[tuple[str, str]]:
    """The settings of a rabbitmq.conf (``key = value``) or redis.conf (``key value``)."""
    found = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.replace(" = ", " ", 1).partition(" ")
            found.append((key, value.strip()))
    return found


@pytest.mark.parametrize("file", COMPOSE_FILES)
def test_compose_services_use_images_and_commands_that_exist(file: str) -> None:
    data = compose(file)
    services = data["services"]
    assert APP_SERVICES <= set(services)
    assert rabbit_nodes(services) and redis_nodes(services)
    paths = app_paths()
    default_command = json.loads(dockerfile()["CMD"][0])
    volumes: list[str] = []
    for name, service in services.items():
        for needed in service.get("depends_on", {}):
            assert needed in services, f"{name} depends on unknown {needed}"
        for source in mounts(service).values():
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: no file {source}"
            else:
                assert source in data["volumes"], f"{name}: undeclared volume {source}"
                volumes.append(source)
        image = service["image"]
        if image != IMAGE:
            assert ":" in image and not image.endswith(":latest"), f"{name}: pin {image}"
            for arg in service.get("command", []):
                assert not arg.startswith("/") or arg in mounts(service), f"{name}: {arg}?"
            continue
        build = service["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
        entrypoint = service.get("entrypoint", ["reliable-msg"])
        argv = [*entrypoint, *service.get("command", default_command)]
        if argv[0] == "reliable-msg":
            assert_cli(argv[1:])
        else:
            assert_module_command(argv)
        for probe in re.findall(r"127\.0\.0\.1:8470(/\w+)", str(service.get("healthcheck"))):
            assert probe in paths, f"{name}: no route {probe}"
    assert len(volumes) == len(set(volumes)), "two services share a volume"


@pytest.mark.parametrize("file", COMPOSE_FILES)
def test_compose_configures_the_service_and_the_demos_consistently(
    monkeypatch: pytest.MonkeyPatch, file: str
) -> None:
    from downstream_demo.groups import GROUPS

    services = compose(file)["services"]
    rabbits = rabbit_nodes(services)
    redises = redis_nodes(services)
    brokers = {n: "service_healthy" for n in rabbits}
    if "redis-cluster-create" in services:  # the cluster is made once its nodes are up
        brokers["redis-cluster-create"] = "service_completed_successfully"
    else:
        brokers.update({n: "service_healthy" for n in redises})
    assert services["migrate"]["command"] == ["migrate"]
    for instance in ("rmsg-1", "rmsg-2"):
        ready = {n: d["condition"] for n, d in services[instance]["depends_on"].items()}
        assert ready == {"migrate": "service_completed_successfully", **brokers}
    env = services["rmsg-1"]["environment"]
    assert services["rmsg-2"]["environment"] == env
    assert env["RMSG_CONFIG"] == "/etc/reliable-msg/config.toml"
    settings = env_settings(monkeypatch, DEPLOY / "config.example.toml", env)
    assert sorted(map(where, settings.amqp_urls)) == sorted(f"{h}:5672" for h in rabbits.values())
    assert sorted(redis_hosts(settings.redis_url)) == sorted(f"{n}:6379" for n in redises)
    assert str(settings.producers["order"].check_url).startswith("http://order:8481/")
    assert all(g.token is not None for g in settings.groups.values())
    for group in GROUPS:
        consumer = services[group]
        assert consumer["command"] == [group]
        demo = consumer["environment"]
        assert demo["DEMO_AMQP_URL"] == env["RMSG_AMQP_URL"]
        assert demo["DEMO_REDIS_URL"] == env["RMSG_REDIS_URL"]
        assert demo["DEMO_QUEUE_PREFIX"] == settings.queue_prefix
        assert demo["DEMO_NAMESPACE"] == settings.fallback.namespace
        assert int(demo["DEMO_SHARDS"]) == settings.fallback.shards
        assert PLACEHOLDER.fullmatch(demo[f"DEMO_{group.upper()}_TOKEN"])


def test_cluster_compose_forms_one_rabbitmq_cluster_of_three_nodes() -> None:
    services = compose(CLUSTER)["services"]
    rabbits = rabbit_nodes(services)
    assert len(rabbits) == 3
    cookies = {services[n]["environment"]["RABBITMQ_ERLANG_COOKIE"] for n in rabbits}
    [cookie] = cookies
    assert PLACEHOLDER.fullmatch(cookie), "a real cookie?"
    confs = {
        source
        for n in rabbits
        for target, source in mounts(services[n]).items()
        if target.startswith("/etc/rabbitmq/conf.d/")
    }
    [conf] = confs
    found = conf_lines(DEPLOY / conf)
    assert ("cluster_formation.peer_discovery_backend", "classic_config") in found
    listed = [v for k, v in found if k.startswith("cluster_formation.classic_config.nodes.")]
    assert sorted(listed) == sorted(f"rabbit@{h}" for h in rabbits.values())
    assert load_settings(DEPLOY / "config.example.toml").queue_type == "quorum"


def test_cluster_compose_creates_one_redis_cluster_with_a_replica_for_each_master() -> None:
    services = compose(CLUSTER)["services"]
    redises = redis_nodes(services)
    assert len(redises) == 6
    for name in redises:
        [_, conf] = services[name]["command"]
        found = dict(conf_lines(DEPLOY / mounts(services[name])[conf]))
        assert found["cluster-enabled"] == "yes" and found["port"] == "6379"
        assert found["cluster-require-full-coverage"] == "no"
    create = services["redis-cluster-create"]
    assert create["restart"] == "no"
    assert create["depends_on"] == {n: {"condition": "service_healthy"} for n in redises}
    [script] = create["command"][2:]
    made = re.search(
        r"redis-cli --cluster create ((?:\S+ )+)--cluster-replicas 1 --cluster-yes$", script
    )
    assert made is not None, script
    assert sorted(made[1].split()) == sorted(f"{n}:6379" for n in redises)


# -- Kubernetes --------------------------------------------------------------------------


def manifests() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert {"apiVersion", "kind", "metadata"} <= set(doc), path
            found[doc["kind"]] = doc
    return found


def test_kubernetes_manifests_are_complete_and_consistent(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    docs = manifests()
    assert {"Deployment", "Service", "ConfigMap", "Secret", "Job"} <= set(docs)
    paths = app_paths()
    deployment = docs["Deployment"]["spec"]
    [container] = deployment["template"]["spec"]["containers"]
    assert container["image"] == IMAGE
    assert_cli(container["args"])
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz" in paths
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz" in paths
    port_names = {p["name"] for p in container["ports"]}
    assert container["readinessProbe"]["httpGet"]["port"] in port_names
    labels = deployment["template"]["metadata"]["labels"]
    assert deployment["selector"]["matchLabels"].items() <= labels.items()
    service = docs["Service"]["spec"]
    assert service["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["ports"]} <= port_names

    [job] = docs["Job"]["spec"]["template"]["spec"]["containers"]
    assert job["image"] == IMAGE
    assert_cli(job["args"])

    secret = docs["Secret"]
    assert all(PLACEHOLDER.search(v) for v in secret["stringData"].values()), "a real secret?"
    config = tmp_path / "config.toml"
    config.write_text(docs["ConfigMap"]["data"]["config.toml"])
    for spec in (container, job):
        assert any(e.get("secretRef", {}).get("name") == "reliable-msg" for e in spec["envFrom"])
        env = {e["name"]: e["value"] for e in spec["env"]}
        assert env["RMSG_CONFIG"] == "/etc/reliable-msg/config.toml"
    settings = env_settings(monkeypatch, config, secret["stringData"])
    assert settings.host == "0.0.0.0" and settings.admin_token is not None
    assert all(g.token is not None for g in settings.groups.values())


# -- systemd -----------------------------------------------------------------------------


def test_systemd_unit_runs_existing_commands() -> None:
    unit: dict[str, list[str]] = {}
    for line in (DEPLOY / "reliable-msg.service").read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            unit.setdefault(key.strip(), []).append(value.strip())
    assert unit["Type"] == ["exec"] and unit["WantedBy"] == ["multi-user.target"]
    for command in unit["ExecStartPre"] + unit["ExecStart"]:
        program, *args = command.split()
        assert program.endswith("/bin/reliable-msg")
        assert_cli(args)
    assert "RMSG_CONFIG=/etc/reliable-msg/config.toml" in unit["Environment"]
