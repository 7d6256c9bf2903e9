"""How the Redis store connects: a plain `redis://` URL, or Redis Sentinel.

`redis+sentinel://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/SERVICE[/DB][?OPTIONS]`
names the sentinels (port 26379 by default) and the service they watch. The
client asks the sentinels for the current master, connects to it, and asks
again whenever a connection to it fails, so after a failover the next request
reaches the promoted replica; while no master is known (the old one is down and
the sentinels have not promoted one yet) every call fails with a connection
error, which the store turns into StoreUnavailable (503).

The user and password in the URL are for the master and its replicas, as in a
`redis://` URL. Sentinels with a password of their own (`requirepass` in
sentinel.conf) get it from `?sentinel_password=` (and `sentinel_username=`);
without it they are asked with no AUTH. `rediss+sentinel://` speaks TLS to the
sentinels and the master alike. `socket_timeout` and `socket_connect_timeout`
(seconds) apply to both as well, as in a `redis://` URL.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

SENTINEL_SCHEMES = ("redis+sentinel://", "rediss+sentinel://")
_SENTINEL_PORT = 26379
_FLOAT_OPTIONS = ("socket_timeout", "socket_connect_timeout")
_SENTINEL_AUTH = {"sentinel_username": "username", "sentinel_password": "password"}


def connect(url: str, **kwargs) -> redis.Redis:
    """A client for `url`; `kwargs` are redis-py connection settings (defaults
    that the URL's query may override), used for every node."""
    if url.startswith(SENTINEL_SCHEMES):
        return _master_client(url, kwargs)
    return redis.Redis.from_url(url, **kwargs)


def _master_client(url: str, kwargs: dict) -> redis.Redis:
    sentinels, service, options = parse_sentinel_url(url)
    node = {**kwargs, **options["node"]}
    sentinel = {k: v for k, v in node.items() if k.startswith("socket_") or k.startswith("ssl")}
    sentinel.update(options["sentinel"])
    # one try per sentinel: on a timeout the next sentinel is asked, and when none
    # answers the call fails now (503) rather than after redis-py's retries
    sentinel.setdefault("retry", Retry(NoBackoff(), 0))
    return Sentinel(sentinels, sentinel_kwargs=sentinel, **node).master_for(service)


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str, dict]:
    """(sentinel addresses, service name, {"node": kwargs for the master,
    "sentinel": auth for the sentinels}); ValueError says what is wrong."""
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    sentinels = [_address(h) for h in hosts.split(",")]
    path = [unquote(p) for p in parts.path.split("/")[1:]]
    if not path or not path[0] or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError(
            "a redis+sentinel:// URL ends in /SERVICE_NAME or /SERVICE_NAME/DB (DB a number), "
            "e.g. redis+sentinel://h1:26379,h2:26379/mymaster/0"
        )
    node: dict = {"db": int(path[1]) if len(path) == 2 else 0}
    if userinfo:
        user, _, password = userinfo.partition(":")
        node.update({k: unquote(v) for k, v in (("username", user), ("password", password)) if v})
    if parts.scheme == "rediss+sentinel":
        node["ssl"] = True
    sentinel: dict = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in _FLOAT_OPTIONS:
            node[name] = float(value)
        elif name in _SENTINEL_AUTH:
            sentinel[_SENTINEL_AUTH[name]] = value
        elif name == "ssl_cert_reqs":
            node[name] = value
        else:
            known = ", ".join((*_FLOAT_OPTIONS, *_SENTINEL_AUTH, "ssl_cert_reqs"))
            raise ValueError(f"unknown option {name!r} in a redis+sentinel:// URL (known: {known})")
    return sentinels, path[0], {"node": node, "sentinel": sentinel}


def _address(text: str) -> tuple[str, int]:
    """`host`, `host:port` or `[v6 address]:port` -> (host, port)."""
    host, port = text, _SENTINEL_PORT
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            port = _port(rest.removeprefix(":"), text)
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
        port = _port(port_text, text)
    if not host:
        raise ValueError(f"a redis+sentinel:// URL lists sentinels as HOST:PORT separated by commas, not {text!r}")
    return host, port


def _port(text: str, address: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"bad port in sentinel address {address!r}")
    return int(text)
