"""Redis clients for the backend and the controller, built one way from a URL and the environment.

Why one function: the Triton backend (``triton_backend.model``, ``triton_backend.e3_router``) and the controller
(``python -m controller``) must reach the same Redis with the same credentials and the same TLS settings. In a
cluster the URL comes from a ConfigMap (it is not a secret) while the password comes from a Secret; keeping the two
apart means a password never sits in a URL that is printed, passed on a command line or stored in a ConfigMap.

Settings, all optional (an empty variable counts as unset, as Kubernetes writes an optional Secret key it lacks):

``APPARATE_REDIS_URL``
    ``redis://``, ``rediss://`` (TLS) or ``unix://``; used when the caller passes no URL.
``APPARATE_REDIS_USERNAME`` / ``APPARATE_REDIS_PASSWORD``
    an ACL user and its password. They win over credentials in the URL, so a Secret can rotate a password without
    touching the URL.
``APPARATE_REDIS_TLS_CA``
    PEM file of the CA that signed the server's certificate (default: the system's trust store).
``APPARATE_REDIS_TLS_CERT`` / ``APPARATE_REDIS_TLS_KEY``
    client certificate and key, for a server that authenticates its clients (``tls-auth-clients yes``); the
    certificate file may also hold the key.

The TLS files are only accepted with a ``rediss://`` URL: with ``redis://`` they would be silently ignored and the
password and every record would cross the network in clear. Bad combinations raise :class:`RedisSettingsError` (a
``ValueError``) when the client is built, at start-up, rather than as a confusing failure at the first command.

Never log a Redis URL as given: log :func:`redact` of it, which hides the password and keeps the user.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.connection import parse_url

from early_exit.errors import EarlyExitError

REDIS_URL_ENV = "APPARATE_REDIS_URL"
REDIS_PREFIX_ENV = "APPARATE_REDIS_PREFIX"
REDIS_USERNAME_ENV = "APPARATE_REDIS_USERNAME"
REDIS_PASSWORD_ENV = "APPARATE_REDIS_PASSWORD"
REDIS_TLS_CA_ENV = "APPARATE_REDIS_TLS_CA"
REDIS_TLS_CERT_ENV = "APPARATE_REDIS_TLS_CERT"
REDIS_TLS_KEY_ENV = "APPARATE_REDIS_TLS_KEY"

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
"""A local set-up: ``make serve`` binds Redis to the loopback interface only."""

SCHEMES = ("redis", "rediss", "unix")
HIDDEN = "***"

_QUERY_PASSWORD = re.compile(r"([?&](?:ssl_)?password=)[^&#]*", re.IGNORECASE)


class RedisSettingsError(EarlyExitError, ValueError):
    """The Redis URL and the ``APPARATE_REDIS_*`` variables do not describe a usable, safe connection."""


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***`` (the user name is kept): safe to log.

    Errs on the side of hiding: everything between ``://`` and the last ``@`` counts as user information, so a
    password with an unencoded ``/``, ``#`` or ``@`` (which URL parsers split in the wrong place) is hidden whole. A
    ``password=`` query parameter, which redis-py also accepts, is hidden too. Never raises.
    """
    start = url.find("://")
    at = url.rfind("@")
    if start >= 0 and at > start:
        user, colon, _ = url[start + 3:at].partition(":")
        url = f"{url[:start + 3]}{user}{':' + HIDDEN if colon else ''}{url[at:]}"
    return _QUERY_PASSWORD.sub(lambda match: match.group(1) + HIDDEN, url)


def _setting(environ: Mapping[str, str], name: str) -> str | None:
    return environ.get(name) or None


def _readable_file(name: str, path: str) -> str:
    if not Path(path).is_file():
        raise RedisSettingsError(f"{name}={path}: no such file")
    if not os.access(path, os.R_OK):
        raise RedisSettingsError(f"{name}={path}: not readable by this process")
    return path


def _apply_credentials(options: dict[str, Any], env: Mapping[str, str]) -> None:
    """Set ``username``/``password`` in ``options``: the environment's win over the URL's."""
    url_username, url_password = options.pop("username", None), options.pop("password", None)
    username = _setting(env, REDIS_USERNAME_ENV) or url_username
    password = _setting(env, REDIS_PASSWORD_ENV) or url_password
    if username and not password:  # the user name is not shown: a password written as redis://secret@host lands here
        raise RedisSettingsError(f"a Redis user name is set (in the URL or {REDIS_USERNAME_ENV}) but no password: "
                                 f"set {REDIS_PASSWORD_ENV}")
    if username:
        options["username"] = username
    if password:
        options["password"] = password


def _apply_tls(options: dict[str, Any], env: Mapping[str, str], scheme: str, shown: str) -> None:
    """Set the TLS files of the environment in ``options``, after checking they fit ``scheme`` and exist."""
    tls = {name: _setting(env, name) for name in (REDIS_TLS_CA_ENV, REDIS_TLS_CERT_ENV, REDIS_TLS_KEY_ENV)}
    given = [name for name, value in tls.items() if value]
    if given and scheme != "rediss":
        raise RedisSettingsError(f"{', '.join(given)} set but the Redis URL {shown} is not rediss://: the TLS "
                                 "files would be ignored and the password sent in clear; use rediss://")
    if tls[REDIS_TLS_KEY_ENV] and not tls[REDIS_TLS_CERT_ENV]:
        raise RedisSettingsError(f"{REDIS_TLS_KEY_ENV} is set without {REDIS_TLS_CERT_ENV}: a client key needs its "
                                 "certificate")
    for name, option in ((REDIS_TLS_CA_ENV, "ssl_ca_certs"), (REDIS_TLS_CERT_ENV, "ssl_certfile"),
                         (REDIS_TLS_KEY_ENV, "ssl_keyfile")):
        value = tls[name]
        if value:
            options[option] = _readable_file(name, value)


def connection_options(url: str | None = None, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Keyword arguments of :class:`redis.ConnectionPool` for ``url`` (default ``APPARATE_REDIS_URL``, then
    :data:`DEFAULT_REDIS_URL`) with the credentials and TLS files of ``environ`` (default ``os.environ``).

    Raises:
        RedisSettingsError: unknown scheme, unparseable URL, a user without a password, TLS files without
            ``rediss://``, a key without its certificate, or a TLS file that does not exist.
    """
    env = os.environ if environ is None else environ
    url = url or _setting(env, REDIS_URL_ENV) or DEFAULT_REDIS_URL
    shown = redact(url)
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError on a malformed port, as parse_url would with less context
    except ValueError:
        # No detail from the parser: with an unencoded reserved character the fragment it quotes may be the password.
        raise RedisSettingsError(f"cannot parse the Redis URL {shown}; percent-encode reserved characters "
                                 f"(/ # ? @ :) in the user name and password, or set {REDIS_PASSWORD_ENV}") from None
    if parts.scheme not in SCHEMES:
        raise RedisSettingsError(f"Redis URL {shown}: the scheme must be one of "
                                 f"{', '.join(scheme + '://' for scheme in SCHEMES)}")
    try:
        options = parse_url(url)
    except ValueError as exc:  # redis-py's own messages name a query parameter, never its value
        raise RedisSettingsError(f"Redis URL {shown}: {exc}") from None

    _apply_credentials(options, env)
    _apply_tls(options, env, parts.scheme, shown)
    return options


def redis_client(
    url: str | None = None,
    *,
    socket_timeout: float | None = None,
    socket_connect_timeout: float | None = None,
    health_check_interval: int = 0,
    environ: Mapping[str, str] | None = None,
) -> redis.Redis:
    """A :class:`redis.Redis` for ``url`` with the credentials and TLS settings of the environment.

    Connects lazily, like :meth:`redis.Redis.from_url`: a Redis that is down at start-up is not an error here (the
    backend and the controller ride outages out). The timeouts are the caller's; a value in the URL's query wins,
    as with ``from_url``. Unlike ``from_url``, ``APPARATE_REDIS_USERNAME`` and ``APPARATE_REDIS_PASSWORD`` win over
    credentials in the URL.

    Args:
        url: ``redis://``, ``rediss://`` or ``unix://`` URL; ``None``: ``APPARATE_REDIS_URL``, then the local default.
        socket_timeout: seconds a command may wait for its reply.
        socket_connect_timeout: seconds a connection (TLS handshake included) may take.
        health_check_interval: seconds of idleness after which a connection is checked with ``PING`` before use.
        environ: the variables to read (tests); default ``os.environ``.

    Raises:
        RedisSettingsError: see :func:`connection_options`.
    """
    options = connection_options(url, environ)
    for name, value in (("socket_timeout", socket_timeout), ("socket_connect_timeout", socket_connect_timeout),
                        ("health_check_interval", health_check_interval)):
        options.setdefault(name, value)
    return redis.Redis.from_pool(redis.ConnectionPool(**options))
