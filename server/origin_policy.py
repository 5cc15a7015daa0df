"""Which origins the cluster may read: the allowlist of the cluster's config, enforced by
the coordinator when a dataset is added or refreshed.

Why it exists: whoever registers a dataset makes the cache nodes read that URL and serve
its bytes to every holder of the reader token. Unchecked, `file:///etc` would serve the
cache hosts' own files, and an http(s) origin (or an S3 `endpoint_url`) pointed at
169.254.169.254 would serve the cloud's instance credentials.

Two settings (cachefs.config.ClusterConfig): `allowed_origins`, URL prefixes or bare
protocols that may be registered (no file:// by default: a local root must be listed;
never a chained `a::b` URL, which would wrap whatever the list allows),
and `allowed_origin_hosts`, hosts that http(s) URLs may reach although they resolve to a
loopback, link-local or metadata address (refused otherwise).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import posixpath
import socket
from dataclasses import dataclass
from typing import Any, Iterator, Mapping
from urllib.parse import urlsplit

from cachefs.common.errors import BadRequest, Forbidden, OriginUnavailable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Instance metadata services. Most are link-local anyway; AWS's IPv6 one and Alibaba's are not.
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254",  # AWS, GCP, Azure, OCI, OpenStack
    "169.254.170.2",  # AWS ECS task metadata and credentials
    "fd00:ec2::254",  # AWS IMDS over IPv6
    "100.100.100.200",  # Alibaba Cloud
))
METADATA_NAMES = frozenset({"metadata", "metadata.google.internal", "metadata.goog", "instance-data",
                            "instance-data.ec2.internal"})
FILE_PROTOCOLS = frozenset({"file", "local"})
HOST_CHECKED = frozenset({"http", "https"})

HOW_TO_SET = ("`cachefs up --allow-origin PREFIX` (adds to the list), CACHEFS_ALLOWED_ORIGINS, [cluster] "
              "allowed_origins in config.toml, or the chart's origins.allowed; then run `cachefs up` again")
HOW_TO_SET_HOSTS = ("`cachefs up --allow-origin-host HOST` (adds to the list), CACHEFS_ALLOWED_ORIGIN_HOSTS, "
                    "[cluster] allowed_origin_hosts in config.toml, or the chart's origins.allowedHosts; then run "
                    "`cachefs up` again")


@dataclass(frozen=True)
class OriginPolicy:
    """What may be registered (picklable: it travels to the coordinator actor)."""

    allowed_origins: tuple[str, ...]
    allowed_hosts: tuple[str, ...] = ()
    resolve_timeout: float = 5.0  # a name that does not resolve by then refuses the request

    async def check(self, origin: str, storage_options: Mapping[str, Any]) -> None:
        """Raise Forbidden (naming the setting to change) unless every part of the origin,
        and every http(s) URL among its storage options, is allowed."""
        if "::" in origin.partition("://")[0]:  # fsspec chains (simplecache::...) would wrap what the list allows
            self._refuse(origin, "chained (::) origins are never allowed")
        self._check_listed(origin)
        for url in _http_urls(origin, storage_options):
            await self._check_host(origin, url)

    # -- allowed_origins ------------------------------------------------------------------
    def _check_listed(self, origin: str) -> None:
        protocol, _, rest = origin.partition("://")
        if protocol in FILE_PROTOCOLS:
            if not rest.startswith("/"):
                raise BadRequest(f"origin {origin!r}: a local origin names an absolute path, like file:///data/set")
            path = os.path.realpath(rest)  # '..' and symlinks resolved: where the bytes really are
            roots = [os.path.realpath(e.partition("://")[2] or "/") for e in self.allowed_origins
                     if e.partition("://")[0] == protocol]
            if not any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots):
                self._refuse(origin, f"{protocol}:// origins must lie under a root listed in it (such as "
                                     f"{protocol}:///data/), and {path} is under none")
            return
        if any(seg in (".", "..") for seg in rest.split("?")[0].split("/")):
            raise BadRequest(f"origin {origin!r} has '.' or '..' segments: write the path out in full")
        for entry in self.allowed_origins:
            e_protocol, sep, prefix = entry.partition("://")
            if sep and e_protocol == protocol and _under(rest, prefix):
                return
        self._refuse(origin, "it matches none of its entries")

    def _refuse(self, origin: str, why: str) -> None:
        raise Forbidden(f"origin {origin!r} is not allowed by this cluster: {why}. The cluster setting "
                        f"allowed_origins lists what may be registered (now {list(self.allowed_origins)}); "
                        f"to allow it, add a prefix with {HOW_TO_SET}", setting="allowed_origins")

    # -- allowed_origin_hosts -------------------------------------------------------------
    async def _check_host(self, origin: str, url: str) -> None:
        try:
            host = urlsplit(url).hostname
        except ValueError as e:
            raise BadRequest(f"origin {origin!r}: {url!r} is not a valid URL: {e}") from e
        if not host:
            raise BadRequest(f"origin {origin!r}: {url!r} names no host")
        if host in self.allowed_hosts:
            return
        if host.rstrip(".") in METADATA_NAMES:
            self._refuse_host(origin, url, f"{host} is a cloud metadata service")
        for ip in await self._addresses(origin, host):
            kind = blocked_kind(ip)
            if kind and not self._host_allowed(ip):
                self._refuse_host(origin, url, f"{host} is {ip}, a {kind} address")

    async def _addresses(self, origin: str, host: str) -> set[IPAddress]:
        try:
            return {ipaddress.ip_address(host)}
        except ValueError:
            pass
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(loop.getaddrinfo(host, None, type=socket.SOCK_STREAM),
                                           self.resolve_timeout)
        except (OSError, asyncio.TimeoutError) as e:
            raise OriginUnavailable(f"origin {origin!r}: cannot resolve {host} from the cache cluster "
                                    f"({type(e).__name__}: {e}); check the name and the cluster's DNS") from e
        return {ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos}

    def _host_allowed(self, ip: IPAddress) -> bool:
        for entry in self.allowed_hosts:
            try:
                if ip in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                continue  # a host name: matched by name before resolving
        return False

    def _refuse_host(self, origin: str, url: str, why: str) -> None:
        raise Forbidden(f"origin {origin!r} would make the cache nodes request {url}, and {why}; origins may "
                        "not reach loopback, link-local or cloud metadata addresses. If this host is really an "
                        f"origin, list it in the cluster setting allowed_origin_hosts with {HOW_TO_SET_HOSTS}",
                        setting="allowed_origin_hosts")


def blocked_kind(ip: IPAddress) -> str:
    """Why an origin may not reach `ip` ('' when it may)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    if ip in METADATA_ADDRESSES:
        return "cloud metadata"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_unspecified:
        return "unspecified (this host)"
    return ""


def _under(rest: str, prefix: str) -> bool:
    """Is 'bucket/a/b' under the prefix 'bucket/a'? Whole segments only: 'bucket2' is not under 'bucket'."""
    prefix = prefix.rstrip("/")
    rest = posixpath.normpath("/" + rest)[1:] if rest else rest
    return not prefix or rest == prefix or rest.startswith(prefix + "/")


def _http_urls(origin: str, storage_options: Mapping[str, Any]) -> Iterator[str]:
    """Every http(s) URL the cache nodes would request: the origin and URL-valued options
    (endpoint_url, client_kwargs.endpoint_url, ...), however deeply nested."""
    if origin.partition("://")[0].lower() in HOST_CHECKED:
        yield origin

    def walk(value: Any) -> Iterator[str]:
        if isinstance(value, str) and value.partition("://")[0].lower() in HOST_CHECKED and "://" in value:
            yield value
        elif isinstance(value, Mapping):
            for v in value.values():
                yield from walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                yield from walk(v)

    yield from walk(storage_options)
