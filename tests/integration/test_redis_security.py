"""A secured Redis, for real: password, an ACL user confined to the project's key prefix, and TLS, each against a
``redis-server`` this module starts on a free loopback port, reached through ``early_exit.redis_connection`` with the
settings in the environment as in a cluster (a Kubernetes Secret)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from controller.config_store import publish_config, read_config
from early_exit.exit_config import ExitConfig
from early_exit.feedback import BatchTiming, FeedbackRecord
from early_exit.keys import DEFAULT_PREFIX, RedisKeys
from early_exit.redis_connection import (
    REDIS_PASSWORD_ENV,
    REDIS_TLS_CA_ENV,
    REDIS_TLS_CERT_ENV,
    REDIS_TLS_KEY_ENV,
    REDIS_USERNAME_ENV,
    redis_client,
)
from triton_backend.config_watcher import ConfigWatcher
from triton_backend.feedback_publisher import FeedbackPublisher
from workload.stack import ROOT, free_port, redis_server_binary

pytestmark = pytest.mark.integration

ACL_EXAMPLE = ROOT / "deploy" / "redis" / "users.acl.example"
KEYS = RedisKeys("m")  # the default prefix, the one the example ACL confines its user to
ADMIN_PASSWORD = "admin-Zq8-only-for-this-test"
APPARATE_USER = "apparate"
APPARATE_PASSWORD = "apparate-Xk3-only-for-this-test"
GROUP = "test-group"

_SETTINGS = (REDIS_PASSWORD_ENV, REDIS_USERNAME_ENV, REDIS_TLS_CA_ENV, REDIS_TLS_CERT_ENV, REDIS_TLS_KEY_ENV,
             "APPARATE_REDIS_URL")


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what a test sets: a developer's own APPARATE_REDIS_* must not leak in."""
    for name in _SETTINGS:
        monkeypatch.delenv(name, raising=False)


@contextlib.contextmanager
def _redis_server(log_dir: Path, port: int, *args: str, tls: bool = False) -> Iterator[subprocess.Popen[bytes]]:
    """A ``redis-server`` on 127.0.0.1 with ``args``, no persistence; stopped (and reaped) on exit."""
    command = [redis_server_binary(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(log_dir), *(("--port", "0", "--tls-port", str(port)) if tls else ("--port", str(port))),
               *args]
    log = log_dir / f"redis-{port}.log"
    with log.open("wb") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            if process.poll() is not None:
                output = log.read_text(errors="replace")
                if tls and "TLS" in output and ("not" in output or "support" in output):
                    pytest.skip(f"this redis-server cannot serve TLS: {output[-500:]}")
                raise RuntimeError(f"redis-server exited with code {process.returncode}:\n{output[-3000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server not listening on {port} (log: {log})")
            time.sleep(0.05)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def _eventually(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def _sha256(password: str) -> str:
    return hashlib.sha256(password.encode()).hexdigest()


# --- (a) a password from the environment ----------------------------------------------------------------------------


def test_requirepass_refuses_a_client_without_the_password_and_admits_one_with_it_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    with _redis_server(tmp_path, port, "--requirepass", APPARATE_PASSWORD):
        with pytest.raises(redis.AuthenticationError):
            redis_client(url, socket_timeout=2).ping()
        monkeypatch.setenv(REDIS_PASSWORD_ENV, "wrong")
        with pytest.raises(redis.AuthenticationError):
            redis_client(url, socket_timeout=2).ping()
        monkeypatch.setenv(REDIS_PASSWORD_ENV, APPARATE_PASSWORD)
        assert redis_client(url, socket_timeout=2).ping()
        # The Secret wins over a stale password left in the URL.
        assert redis_client(f"redis://:stale@127.0.0.1:{port}/0", socket_timeout=2).ping()


# --- (b) an ACL user confined to the project's prefix ---------------------------------------------------------------


def _acl_file(directory: Path) -> Path:
    """The example ACL of ``deploy/redis`` with this test's password hashes: the rules under test are the shipped
    ones."""
    text = ACL_EXAMPLE.read_text(encoding="utf-8")
    text = text.replace("ADMIN_PASSWORD_SHA256", _sha256(ADMIN_PASSWORD))
    text = text.replace("APPARATE_PASSWORD_SHA256", _sha256(APPARATE_PASSWORD))
    path = directory / "users.acl"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def acl_redis(tmp_path: Path) -> Iterator[tuple[str, redis.Redis]]:
    """URL of a Redis run with the example ACL, and an admin client (the ``default`` user) to inspect it."""
    port = free_port()
    with _redis_server(tmp_path, port, "--aclfile", str(_acl_file(tmp_path))):
        url = f"redis://127.0.0.1:{port}/0"
        with redis.Redis.from_url(url, password=ADMIN_PASSWORD) as admin:
            yield url, admin


def test_the_example_acl_confines_its_user_to_the_projects_prefix() -> None:
    rules = ACL_EXAMPLE.read_text(encoding="utf-8").split()
    assert f"~{DEFAULT_PREFIX}:*" in rules and f"&{DEFAULT_PREFIX}:*" in rules
    assert not [rule for rule in rules if rule.startswith(("~", "&", "%")) and DEFAULT_PREFIX not in rule
                and rule not in ("~*", "&*")] and rules.count("~*") == 1  # only the admin (default) user has all


def _record() -> FeedbackRecord:
    return FeedbackRecord("m", 1, (0,), np.ones((1, 4), np.float32), np.zeros((1, 4), int), np.zeros(4, int),
                          np.full(4, 1), BatchTiming(1.0, 0.1, 0.0, np.ones(4)))


def test_the_acl_user_runs_everything_the_backend_and_the_controller_do_within_the_prefix(
    acl_redis: tuple[str, redis.Redis], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, admin = acl_redis
    monkeypatch.setenv(REDIS_USERNAME_ENV, APPARATE_USER)
    monkeypatch.setenv(REDIS_PASSWORD_ENV, APPARATE_PASSWORD)
    client = redis_client(url, socket_timeout=2, socket_connect_timeout=2, health_check_interval=5)
    assert client.ping()
    # The backend: manifest registration and the feedback stream, the configuration watch (GET + SUBSCRIBE).
    published: list[int] = []
    publisher = FeedbackPublisher(client, KEYS, '{"name": "m"}', flush_interval=0.01, on_published=published.append)
    watcher = ConfigWatcher(client, KEYS, num_ramps=3, initial=ExitConfig("m", 0, {0: 1.0}), poll_interval=0.05)
    try:
        publisher.offer(_record())
        assert _eventually(lambda: sum(published) == 1)
        assert admin.sismember(RedisKeys.models(), "m") and admin.get(KEYS.manifest) is not None
        # The controller: configuration compare-and-set (WATCH/MULTI/EXEC, SET, PUBLISH) and the consumer group.
        written = publish_config(client, KEYS, {1: 0.8}, writer="test")
        assert written is not None and _eventually(lambda: watcher.current == written)
        assert read_config(client, KEYS) == written
        assert client.smembers(RedisKeys.models()) == {b"m"}
        client.xgroup_create(KEYS.feedback, GROUP, id="0", mkstream=True)
        replies = client.xreadgroup(GROUP, "c", {KEYS.feedback: ">"}, count=10)
        entries = replies[0][1]
        assert len(entries) == 1 and client.xack(KEYS.feedback, GROUP, entries[0][0]) == 1
        client.xautoclaim(KEYS.feedback, GROUP, "c", min_idle_time=0)
        # A Lua script (the controller's lease is one) on keys inside the prefix.
        script = client.register_script("return redis.call('INCR', KEYS[1])")
        assert script(keys=[f"{DEFAULT_PREFIX}:controller:test"]) == 1
    finally:
        watcher.close()
        publisher.close()
    assert admin.acl_log() == [], "the ACL refused something the project does"


def test_the_acl_user_is_refused_keys_channels_and_commands_outside_the_prefix(
    acl_redis: tuple[str, redis.Redis], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, admin = acl_redis
    monkeypatch.setenv(REDIS_USERNAME_ENV, APPARATE_USER)
    monkeypatch.setenv(REDIS_PASSWORD_ENV, APPARATE_PASSWORD)
    client = redis_client(url, socket_timeout=2)
    assert client.set(KEYS.config, "{}") and client.get(KEYS.config) == b"{}"
    refused: list[Callable[[], object]] = [
        lambda: client.set("other:config", "{}"),
        lambda: client.get("session:42"),
        lambda: client.xadd("other:feedback", {"f": "v"}),
        lambda: client.publish("other:notify", "x"),
        lambda: client.flushall(),
        lambda: client.keys("*"),
        lambda: client.scan(0),
        lambda: client.config_get("*"),
        lambda: client.acl_list(),
        lambda: client.register_script("return redis.call('GET', KEYS[1])")(keys=["session:42"]),
    ]
    for attempt in refused:
        with pytest.raises(redis.ResponseError, match="(?i)NOPERM|no permissions"):
            attempt()
    pubsub = client.pubsub()
    try:
        with pytest.raises(redis.ResponseError, match="(?i)NOPERM|no permissions"):
            pubsub.subscribe("other:notify")
            pubsub.get_message(timeout=1)
    finally:
        pubsub.close()
    assert admin.exists("other:config", "other:feedback") == 0
    assert {entry["username"] for entry in admin.acl_log()} == {APPARATE_USER}  # ... and Redis logged each refusal


def test_the_acl_refuses_a_wrong_password_and_the_unauthenticated_default_user(
    acl_redis: tuple[str, redis.Redis], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, _ = acl_redis
    with pytest.raises(redis.AuthenticationError):
        redis_client(url, socket_timeout=2).ping()  # no credentials: the default user needs its own password
    monkeypatch.setenv(REDIS_USERNAME_ENV, APPARATE_USER)
    monkeypatch.setenv(REDIS_PASSWORD_ENV, ADMIN_PASSWORD)  # the other user's password
    with pytest.raises(redis.AuthenticationError):
        redis_client(url, socket_timeout=2).ping()


def _controller(url: str, env: dict[str, str], log: Path) -> str:
    """Run ``python -m controller`` for two seconds; its whole output."""
    environ = {**{k: v for k, v in os.environ.items() if k not in _SETTINGS}, **env}
    result = subprocess.run([sys.executable, "-m", "controller", "--redis-url", url, "--duration", "2"],
                            cwd=ROOT, env=environ, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    log.write_text(output)
    assert result.returncode == 0, output
    return output


def test_the_controller_cli_connects_with_credentials_from_the_environment_and_never_logs_them(
    acl_redis: tuple[str, redis.Redis], tmp_path: Path
) -> None:
    url, admin = acl_redis
    admin.config_resetstat()
    admin.acl_log_reset()
    output = _controller(url, {REDIS_USERNAME_ENV: APPARATE_USER, REDIS_PASSWORD_ENV: APPARATE_PASSWORD},
                         tmp_path / "good.log")
    assert APPARATE_PASSWORD not in output
    assert "username-password" not in output and "NOPERM" not in output, output
    assert admin.acl_log() == [], "the controller was refused something"
    stats = admin.info("commandstats")
    ran = {name for name in stats if name.split("_", 1)[1].split("|")[0] not in ("auth", "acl", "info", "config",
                                                                                 "ping", "client", "hello")}
    assert ran, f"the controller ran no command: {sorted(stats)}"
    # With a wrong password it keeps retrying (fail-static), says why, and still shows no password.
    wrong = "wrong-Pq1-only-for-this-test"
    output = _controller(url, {REDIS_USERNAME_ENV: APPARATE_USER, REDIS_PASSWORD_ENV: wrong}, tmp_path / "bad.log")
    assert "username-password" in output, output
    assert wrong not in output and APPARATE_PASSWORD not in output


# --- (c) TLS --------------------------------------------------------------------------------------------------------


def _openssl(directory: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=60)


def _certificate(directory: Path, name: str, extensions: str) -> None:
    """``<name>.crt``/``<name>.key``: an EC key signed by ``ca.crt``, with ``extensions``."""
    (directory / f"{name}.ext").write_text(extensions)
    _openssl(directory, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
    _openssl(directory, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", "-extfile", f"{name}.ext")


@pytest.fixture
def certificates(tmp_path: Path) -> Path:
    """A throw-away CA, a server certificate for 127.0.0.1/localhost and a client certificate, made with the
    ``openssl`` command line."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command line is needed to make test certificates")
    directory = tmp_path / "pki"
    directory.mkdir()
    _openssl(directory, "req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=apparate test CA",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    common = "basicConstraints=CA:FALSE\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
    _certificate(directory, "server", common + "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
                 "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _certificate(directory, "client", common + "keyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n")
    return directory


def _tls_args(pki: Path, authenticate_clients: bool) -> list[str]:
    return ["--tls-cert-file", str(pki / "server.crt"), "--tls-key-file", str(pki / "server.key"),
            "--tls-ca-cert-file", str(pki / "ca.crt"), "--tls-auth-clients", "yes" if authenticate_clients else "no"]


def test_tls_with_the_ca_from_the_environment_works_and_plain_redis_does_not(
    certificates: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    with _redis_server(tmp_path, port, *_tls_args(certificates, False), "--requirepass", APPARATE_PASSWORD, tls=True):
        monkeypatch.setenv(REDIS_PASSWORD_ENV, APPARATE_PASSWORD)
        with pytest.raises(redis.ConnectionError):  # the server's certificate is verified: not in the system store
            redis_client(f"rediss://127.0.0.1:{port}/0", socket_timeout=2, socket_connect_timeout=2).ping()
        monkeypatch.setenv(REDIS_TLS_CA_ENV, str(certificates / "ca.crt"))
        for host in ("127.0.0.1", "localhost"):  # the name is checked against the certificate's
            client = redis_client(f"rediss://{host}:{port}/0", socket_timeout=2, socket_connect_timeout=2)
            assert client.connection_pool.connection_class is redis.SSLConnection
            assert client.set(KEYS.config, "{}") and client.get(KEYS.config) == b"{}"
        monkeypatch.delenv(REDIS_TLS_CA_ENV)
        with pytest.raises(redis.RedisError):  # plain text to the TLS port: no reply the client can read
            redis_client(f"redis://127.0.0.1:{port}/0", socket_timeout=2, socket_connect_timeout=2).ping()


def test_a_server_that_authenticates_clients_admits_only_the_one_with_a_certificate(
    certificates: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    url = f"rediss://127.0.0.1:{port}/0"
    with _redis_server(tmp_path, port, *_tls_args(certificates, True), tls=True):
        monkeypatch.setenv(REDIS_TLS_CA_ENV, str(certificates / "ca.crt"))
        with pytest.raises(redis.ConnectionError):
            redis_client(url, socket_timeout=2, socket_connect_timeout=2).ping()
        monkeypatch.setenv(REDIS_TLS_CERT_ENV, str(certificates / "client.crt"))
        monkeypatch.setenv(REDIS_TLS_KEY_ENV, str(certificates / "client.key"))
        assert redis_client(url, socket_timeout=2, socket_connect_timeout=2).ping()
