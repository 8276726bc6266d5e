"""Offline checks of deploy/: manifests parse and agree with each other, the Dockerfiles and the repository."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import tomllib
import yaml

from triton_backend.server import _SHIM

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILES = sorted(DEPLOY.glob("*.Dockerfile"))
SHIM_PATH = "/opt/tritonserver/backends/apparate/model.py"
SHIM_IMPORT = next(line for line in _SHIM.splitlines() if line.startswith("from triton_backend.model import"))
TRITON_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}


def _yaml_files() -> list[Path]:
    return sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])


def _load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict[str, Any]]:
    """Every Kubernetes object listed by the kustomization, keyed by (kind, name)."""
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for name in _load(K8S / "kustomization.yaml")[0]["resources"]:
        for doc in _load(K8S / name):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in objects, f"duplicate {key}"
            objects[key] = doc
    return objects


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _load(DEPLOY / "docker-compose.yml")[0]


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p.get("name") == port)


def _flag(argv: list[str], flag: str) -> str:
    """Value of ``--flag value`` or ``--flag=value`` in ``argv``."""
    for i, arg in enumerate(argv):
        if arg == flag:
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{flag} missing from {argv}")


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text(encoding="utf-8"))
    lines = [line.strip() for line in text.splitlines()]
    pairs = [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]
    return [(pair[0].upper(), pair[1] if len(pair) > 1 else "") for pair in pairs]


def _is_pinned(image: str) -> bool:
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in ("", "latest")


def test_every_yaml_parses() -> None:
    files = _yaml_files()
    assert len(files) >= 8
    for path in files:
        docs = _load(path)
        assert docs and all(isinstance(doc, dict) for doc in docs), path


def test_kustomization_lists_exactly_the_manifests() -> None:
    resources = _load(K8S / "kustomization.yaml")[0]["resources"]
    present = {p.name for p in K8S.iterdir() if p.suffix in (".yaml", ".yml")} - {"kustomization.yaml"}
    assert len(resources) == len(set(resources))
    assert set(resources) == present


def test_objects_share_the_namespace_and_selectors_match(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    (namespace,) = [name for kind, name in k8s if kind == "Namespace"]
    for (kind, name), doc in k8s.items():
        if kind != "Namespace":
            assert doc["metadata"].get("namespace") == namespace, (kind, name)
        if kind == "Deployment":
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
            container = _container(doc)
            assert _is_pinned(container["image"]), container["image"]
            assert {"requests", "limits"} <= container["resources"].keys(), name
    for (kind, name), service in k8s.items():
        if kind == "Service":
            pods = [_container(d) for (k, _), d in k8s.items() if k == "Deployment"
                    and service["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
            assert len(pods) == 1, f"Service {name} selects {len(pods)} Deployments"
            for port in service["spec"]["ports"]:
                _port_number(pods[0], port.get("targetPort", port["port"]))  # raises if a named port is missing


def test_triton_deployment(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    container = _container(k8s[("Deployment", "triton")])
    resources = container["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) >= 1
    for probe, path in (("readinessProbe", "/v2/health/ready"), ("livenessProbe", "/v2/health/live")):
        get = container[probe]["httpGet"]
        assert get["path"] == path and _port_number(container, get["port"]) == TRITON_PORTS["http"], probe
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == TRITON_PORTS
    config_maps = {ref["configMapRef"]["name"] for ref in container.get("envFrom", []) if "configMapRef" in ref}
    assert any("APPARATE_REDIS_URL" in k8s[("ConfigMap", name)]["data"] for name in config_maps)
    assert "APPARATE_REDIS_URL" not in {env["name"] for env in container.get("env", [])}  # not overridden

    service = k8s[("Service", "triton")]
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == TRITON_PORTS
    annotations = service["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "8002"


def test_configmap_redis_url_points_at_the_redis_service(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    (config,) = [doc for (kind, _), doc in k8s.items() if kind == "ConfigMap"]
    url = urlsplit(config["data"]["APPARATE_REDIS_URL"])
    assert url.scheme == "redis"
    host = url.hostname.split(".")
    redis_service = k8s[("Service", host[0])]
    assert len(host) == 1 or host[1] == redis_service["metadata"]["namespace"]
    assert url.port in {p["port"] for p in redis_service["spec"]["ports"]}
    redis = _container(k8s[("Deployment", host[0])])
    assert redis["image"].startswith("redis:")
    assert config["data"]["APPARATE_REDIS_PREFIX"]


def test_controller_deployment_runs_the_controller_with_configmap_values(
    k8s: dict[tuple[str, str], dict[str, Any]],
) -> None:
    deployment = k8s[("Deployment", "controller")]
    assert deployment["spec"]["replicas"] == 1
    container = _container(deployment)
    argv = [*container["command"], *container["args"]]
    assert any(argv[i:i + 2] == ["-m", "controller"] for i in range(len(argv)))
    assert _flag(argv, "--redis-url") == "$(APPARATE_REDIS_URL)"
    (config,) = [doc for (kind, _), doc in k8s.items() if kind == "ConfigMap"]
    env = {e["name"]: e["valueFrom"]["configMapKeyRef"] for e in container["env"]}
    for variable in re.findall(r"\$\((\w+)\)", " ".join(argv)):
        ref = env[variable]
        assert ref["name"] == config["metadata"]["name"] and ref["key"] in config["data"], variable
    for flag in ("--budget", "--window", "--min-fresh", "--z"):
        value = _flag(argv, flag)
        float(config["data"][env[value[2:-1]]["key"]])  # numeric, read from the ConfigMap
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_compose_services_and_hosts(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"redis", "triton", "controller"} <= services.keys()
    triton_url = urlsplit(services["triton"]["environment"]["APPARATE_REDIS_URL"])
    controller_url = urlsplit(_flag(services["controller"]["command"], "--redis-url"))
    for url in (triton_url, controller_url):
        assert url.hostname in services and services[url.hostname]["image"].startswith("redis:")
        assert url.port == 6379
    published = {int(spec.split(":")[-1]) for spec in services["triton"]["ports"]}
    assert published == set(TRITON_PORTS.values())
    for service in services.values():
        assert _is_pinned(service["image"]), service["image"]
        if "build" in service:
            assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).resolve().is_file()
    assert "deploy" not in services["triton"]  # the GPU reservation lives in the override file


def test_compose_gpu_override(compose: dict[str, Any]) -> None:
    override = _load(DEPLOY / "docker-compose.gpu.yml")[0]["services"]
    assert override.keys() <= compose["services"].keys()
    devices = override["triton"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_base_is_pinned_and_copies_exist(dockerfile: Path) -> None:
    instructions = _instructions(dockerfile)
    bases = [args.split()[0] for op, args in instructions if op == "FROM"]
    assert bases and all(_is_pinned(image) for image in bases), bases
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore").read_text(encoding="utf-8").split()
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"]
    copied = set()
    for op, args in instructions:
        if op == "COPY":
            *sources, _ = args.split()
            for source in sources:
                assert (ROOT / source).exists(), source
                assert f"!{source}" in ignore, f"{source} is excluded by the .dockerignore"
                copied.add(source.rstrip("/"))
    assert {pattern.rstrip("*") for pattern in packages["find"]["include"]} | {"pyproject.toml"} <= copied


def test_triton_dockerfile_installs_the_backend_shim_and_the_repository() -> None:
    instructions = _instructions(DEPLOY / "triton.Dockerfile")
    runs = " ".join(args for op, args in instructions if op == "RUN")
    assert SHIM_IMPORT in runs and SHIM_PATH in runs
    assert ("COPY", "model_repository/ /models/") in instructions
    (cmd,) = [args for op, args in instructions if op == "CMD"]
    argv = yaml.safe_load(cmd)  # exec form is a JSON array
    assert argv[0] == "tritonserver" and "--model-repository=/models" in argv and "--allow-metrics=true" in argv
    assert "torch" in runs and "numpy==1" in runs and "redis" in runs


def test_controller_dockerfile_runs_the_controller_without_torch() -> None:
    instructions = _instructions(DEPLOY / "controller.Dockerfile")
    (entrypoint,) = [yaml.safe_load(args) for op, args in instructions if op == "ENTRYPOINT"]
    assert entrypoint[-2:] == ["-m", "controller"]
    assert any(op == "USER" and args not in ("root", "0") for op, args in instructions)
    requirements = (DEPLOY / "requirements-controller.txt").read_text(encoding="utf-8")
    names = {re.split(r"[=<>\[ ]", line)[0].lower() for line in requirements.splitlines() if line and line[0] != "#"}
    assert names == {"numpy", "redis"}


def _config_field(text: str, field: str) -> str | None:
    match = re.search(rf'^{field}: "([^"]+)"', text, re.MULTILINE)
    return match.group(1) if match else None


def test_model_repository_entries_and_the_models_triton_loads() -> None:
    configs = {p.parent.name: p.read_text(encoding="utf-8") for p in (ROOT / "model_repository").glob("*/config.pbtxt")}
    assert {"cifar10_resnet", "cifar10_resnet_vanilla"} <= configs.keys()
    for name, text in configs.items():
        assert _config_field(text, "name") == name
    assert _config_field(configs["cifar10_resnet"], "backend") == "apparate"
    assert _config_field(configs["cifar10_resnet_vanilla"], "backend") == "apparate"

    (cmd,) = [args for op, args in _instructions(DEPLOY / "triton.Dockerfile") if op == "CMD"]
    loaded = {arg.split("=", 1)[1] for arg in yaml.safe_load(cmd) if arg.startswith("--load-model=")}
    assert {"cifar10_resnet", "cifar10_resnet_vanilla"} <= loaded <= configs.keys()
    for name in loaded:  # an ensemble's steps must be loaded too, or Triton refuses to start
        assert set(re.findall(r'model_name: "([^"]+)"', configs[name])) <= loaded, name


def test_readme_documents_build_and_gpu_instance_group() -> None:
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    for needle in ("docker build -f deploy/triton.Dockerfile", "kubectl apply -k deploy/k8s", "KIND_GPU",
                   "docker compose"):
        assert needle in readme, needle
