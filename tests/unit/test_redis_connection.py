"""Redis connection settings: URL parsing, the environment's precedence, TLS checks and redaction (no server needed;
``tests/integration/test_redis_security.py`` connects to real ones)."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import redis
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from early_exit import redis_connection
from early_exit.errors import EarlyExitError
from early_exit.redis_connection import (
    DEFAULT_REDIS_URL,
    REDIS_PASSWORD_ENV,
    REDIS_TLS_CA_ENV,
    REDIS_TLS_CERT_ENV,
    REDIS_TLS_KEY_ENV,
    REDIS_URL_ENV,
    REDIS_USERNAME_ENV,
    RedisSettingsError,
    connection_options,
    redact,
    redis_client,
)


def _kwargs(client: redis.Redis) -> dict[str, Any]:
    return client.connection_pool.connection_kwargs


@pytest.fixture
def pem(tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    path.write_text("not parsed until a connection is made\n")
    return path


# --- the URL --------------------------------------------------------------------------------------------------------


def test_host_port_and_db_come_from_the_url() -> None:
    client = redis_client("redis://redis.apparate:6380/2", environ={})
    assert client.connection_pool.connection_class is redis.Connection
    assert {k: _kwargs(client)[k] for k in ("host", "port", "db")} == {"host": "redis.apparate", "port": 6380, "db": 2}


def test_rediss_selects_tls_and_unix_a_socket() -> None:
    assert redis_client("rediss://redis:6379/0", environ={}).connection_pool.connection_class is redis.SSLConnection
    client = redis_client("unix:///run/redis.sock?db=3", environ={})
    assert client.connection_pool.connection_class is redis.UnixDomainSocketConnection
    assert _kwargs(client)["path"] == "/run/redis.sock" and _kwargs(client)["db"] == 3


def test_no_url_reads_the_environment_then_the_local_default() -> None:
    assert connection_options(None, {REDIS_URL_ENV: "redis://from-env:7000/1"})["host"] == "from-env"
    assert connection_options(None, {REDIS_URL_ENV: ""})["host"] == "127.0.0.1"  # empty counts as unset
    assert DEFAULT_REDIS_URL.startswith("redis://127.0.0.1:")


def test_an_explicit_url_wins_over_the_environments() -> None:
    assert connection_options("redis://explicit:6379/0", {REDIS_URL_ENV: "redis://from-env:7000/1"})["host"] == "explicit"


def test_the_callers_timeouts_apply_unless_the_url_sets_them() -> None:
    client = redis_client("redis://h:6379/0", socket_timeout=0.5, socket_connect_timeout=0.25, health_check_interval=5,
                          environ={})
    assert (_kwargs(client)["socket_timeout"], _kwargs(client)["socket_connect_timeout"]) == (0.5, 0.25)
    assert _kwargs(client)["health_check_interval"] == 5
    assert _kwargs(redis_client("redis://h/0?socket_timeout=3", socket_timeout=0.5, environ={}))["socket_timeout"] == 3


def test_a_client_is_built_without_connecting() -> None:
    redis_client("redis://127.0.0.1:1/0", environ={})  # nothing listens on port 1: a down Redis is not a start error


# --- credentials ----------------------------------------------------------------------------------------------------


def test_credentials_in_the_url_are_used_decoded() -> None:
    options = connection_options("redis://apparate:p%40ss%2Fw0rd@h:6379/0", {})
    assert (options["username"], options["password"]) == ("apparate", "p@ss/w0rd")


def test_the_environments_credentials_win_over_the_urls() -> None:
    env = {REDIS_USERNAME_ENV: "apparate", REDIS_PASSWORD_ENV: "from-secret"}
    options = connection_options("redis://someone:stale@h:6379/0", env)
    assert (options["username"], options["password"]) == ("apparate", "from-secret")
    assert connection_options("redis://h/0?password=stale", env)["password"] == "from-secret"


def test_a_password_alone_authenticates_the_default_user() -> None:
    options = connection_options("redis://h:6379/0", {REDIS_PASSWORD_ENV: "s3cret"})
    assert options["password"] == "s3cret" and "username" not in options


def test_the_environment_can_complete_the_urls_credentials() -> None:
    options = connection_options("redis://apparate@h:6379/0", {REDIS_PASSWORD_ENV: "s3cret"})
    assert (options["username"], options["password"]) == ("apparate", "s3cret")


def test_empty_variables_count_as_unset() -> None:
    options = connection_options("redis://:from-url@h/0", {REDIS_USERNAME_ENV: "", REDIS_PASSWORD_ENV: ""})
    assert options["password"] == "from-url" and "username" not in options


def test_no_credentials_anywhere_means_none() -> None:
    options = connection_options("redis://h:6379/0", {})
    assert "username" not in options and "password" not in options


def test_a_user_without_a_password_is_refused_without_showing_the_name() -> None:
    with pytest.raises(RedisSettingsError, match=REDIS_PASSWORD_ENV) as raised:
        connection_options("redis://looks-like-a-password@h:6379/0", {})
    assert "looks-like-a-password" not in str(raised.value)
    with pytest.raises(RedisSettingsError):
        connection_options("redis://h:6379/0", {REDIS_USERNAME_ENV: "apparate"})


# --- TLS ------------------------------------------------------------------------------------------------------------


def test_tls_files_from_the_environment_reach_the_connection(tmp_path: Path, pem: Path) -> None:
    cert, key = tmp_path / "client.crt", tmp_path / "client.key"
    cert.write_text("x")
    key.write_text("x")
    env = {REDIS_TLS_CA_ENV: str(pem), REDIS_TLS_CERT_ENV: str(cert), REDIS_TLS_KEY_ENV: str(key)}
    client = redis_client("rediss://redis:6379/0", environ=env)
    assert client.connection_pool.connection_class is redis.SSLConnection
    kwargs = _kwargs(client)
    assert (kwargs["ssl_ca_certs"], kwargs["ssl_certfile"], kwargs["ssl_keyfile"]) == (str(pem), str(cert), str(key))
    assert kwargs.get("ssl_cert_reqs", "required") == "required"  # verification stays on


def test_a_certificate_may_hold_its_key(pem: Path) -> None:
    assert connection_options("rediss://redis/0", {REDIS_TLS_CERT_ENV: str(pem)})["ssl_certfile"] == str(pem)


@pytest.mark.parametrize("scheme", ["redis", "unix"])
@pytest.mark.parametrize("variable", [REDIS_TLS_CA_ENV, REDIS_TLS_CERT_ENV])
def test_tls_files_without_rediss_are_refused(pem: Path, scheme: str, variable: str) -> None:
    url = "redis://:pw@redis:6379/0" if scheme == "redis" else "unix:///run/redis.sock"
    with pytest.raises(RedisSettingsError, match="rediss://") as raised:
        connection_options(url, {variable: str(pem)})
    assert variable in str(raised.value) and ":pw@" not in str(raised.value)


def test_a_key_without_its_certificate_is_refused(pem: Path) -> None:
    with pytest.raises(RedisSettingsError, match=REDIS_TLS_CERT_ENV):
        connection_options("rediss://redis/0", {REDIS_TLS_KEY_ENV: str(pem)})


@pytest.mark.parametrize("variable", [REDIS_TLS_CA_ENV, REDIS_TLS_CERT_ENV])
def test_a_missing_tls_file_is_named(tmp_path: Path, variable: str) -> None:
    missing = tmp_path / "nowhere" / "ca.pem"
    with pytest.raises(RedisSettingsError, match="no such file") as raised:
        connection_options("rediss://redis/0", {variable: str(missing)})
    assert variable in str(raised.value) and str(missing) in str(raised.value)


def test_a_directory_is_not_a_tls_file(tmp_path: Path) -> None:
    with pytest.raises(RedisSettingsError, match=REDIS_TLS_CA_ENV):
        connection_options("rediss://redis/0", {REDIS_TLS_CA_ENV: str(tmp_path)})


# --- malformed URLs -------------------------------------------------------------------------------------------------


def test_an_unknown_scheme_is_refused_with_the_url_redacted() -> None:
    with pytest.raises(RedisSettingsError, match="rediss://") as raised:
        connection_options("http://admin:hunter2@redis:6379/0", {})
    assert "hunter2" not in str(raised.value) and "admin:***@" in str(raised.value)


def test_an_unencoded_slash_in_the_password_leaks_no_part_of_it() -> None:
    # The parser splits at the '/': it reads ':hun' as the authority and rejects 'hun' as a port.
    with pytest.raises(RedisSettingsError, match="percent-encode") as raised:
        connection_options("redis://:hun/ter2@redis:6379/0", {})
    assert "hun" not in str(raised.value) and "ter2" not in str(raised.value)
    # ... nor does the traceback a logger would write: the parser's error (which quotes 'hun') is not chained
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


def test_a_bad_query_value_is_named() -> None:
    with pytest.raises(RedisSettingsError, match="socket_timeout"):
        connection_options("redis://:pw@redis/0?socket_timeout=soon", {})


def test_settings_errors_are_value_errors_and_the_projects() -> None:
    assert issubclass(RedisSettingsError, ValueError) and issubclass(RedisSettingsError, EarlyExitError)


def test_every_setting_is_an_apparate_redis_variable() -> None:
    names = {value for name, value in vars(redis_connection).items() if name.startswith("REDIS_") and
             name.endswith("_ENV")}
    assert names == {"APPARATE_REDIS_URL", "APPARATE_REDIS_PREFIX", "APPARATE_REDIS_USERNAME",
                     "APPARATE_REDIS_PASSWORD", "APPARATE_REDIS_TLS_CA", "APPARATE_REDIS_TLS_CERT",
                     "APPARATE_REDIS_TLS_KEY"}


# --- redaction ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("redis://apparate:s3cret@redis:6379/0", "redis://apparate:***@redis:6379/0"),
    ("rediss://:s3cret@redis:6380/1", "rediss://:***@redis:6380/1"),
    ("redis://apparate@redis:6379/0", "redis://apparate@redis:6379/0"),
    ("redis://apparate:p%40ss@redis/0", "redis://apparate:***@redis/0"),
    ("redis://apparate:p@ss@redis/0", "redis://apparate:***@redis/0"),  # unencoded '@': the last one ends it
    ("redis://:hun/ter2@redis/0", "redis://:***@redis/0"),  # unencoded '/': hidden whole, not split like a parser
    ("unix://apparate:s3cret@/run/redis.sock?db=0", "unix://apparate:***@/run/redis.sock?db=0"),
    ("redis://redis/0?password=s3cret&db=1", "redis://redis/0?password=***&db=1"),
    ("rediss://redis/0?ssl_password=s3cret", "rediss://redis/0?ssl_password=***"),
    ("", ""),
    ("not a url", "not a url"),
])
def test_redact_hides_the_password_and_keeps_the_user(url: str, shown: str) -> None:
    assert redact(url) == shown


_PASSWORDS = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF), min_size=6, max_size=40)


@settings(max_examples=200, deadline=None)
@given(user=st.sampled_from(["", "apparate"]), password=_PASSWORDS, encoded=st.booleans(),
       scheme=st.sampled_from(["redis", "rediss", "unix"]))
def test_redact_never_shows_a_password(user: str, password: str, encoded: bool, scheme: str) -> None:
    secret = quote(password, safe="") if encoded else password
    host = "/run/redis.sock" if scheme == "unix" else "redis.apparate:6379/0"
    url = f"{scheme}://{user}:{secret}@{host}"
    assume(secret not in f"{scheme}://{user}:@{host}")  # a "password" that is part of the rest cannot be told apart
    assert secret not in redact(url)
    assert redact(url).startswith(f"{scheme}://{user}:***@")
