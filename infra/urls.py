"""Which URLs a manifest may make the workers read: a scheme allow-list, a root for local files, no metadata hosts.

A manifest on a shared platform is hostile until validated: its URLs make our processes open files and connect
to hosts (SSRF to the cloud metadata service, ``file:///etc/passwd``, ``../`` out of the manifest's folder, a
symlink to a secret, another tenant's bucket). :func:`check_input_url` decides before anything is opened, and its
errors never echo credentials or signatures.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import fsspec

from .redact import redact


# Cloud metadata endpoints (AWS/GCP/Azure/OCI IPv4, AWS IPv6, GCP name): refused whatever the configuration says.
METADATA_HOSTS = frozenset({"169.254.169.254", "fd00:ec2::254", "metadata.google.internal", "metadata"})
LOCAL_SCHEMES = frozenset({"", "file", "local"})


class UrlRefused(ValueError):
    """The URL is outside what the policy allows; the message names the field and the fix."""


@dataclass(frozen=True)
class UrlPolicy:
    """What input URLs may point at. Defaults suit a shared platform: S3, and local files next to a local manifest."""

    allowed_schemes: frozenset[str] = frozenset({"s3", "file"})
    http_hosts: frozenset[str] = frozenset()  # http(s) only to these hosts (and only if "https"/"http" allowed)
    local_roots: tuple[str, ...] = ()  # extra folders local inputs may live in (besides the manifest's folder)
    allowed_prefixes: tuple[str, ...] = ()  # if set, remote inputs must start with one of these
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def trusted_local(cls, *roots: str) -> UrlPolicy:
        """For a single job given on the command line by its own operator: local files anywhere under ``roots``."""
        return cls(local_roots=tuple(roots) or ("/",))


def check_input_url(url: str, *, field_name: str, manifest_url: str | None, policy: UrlPolicy) -> str:
    """Return ``url`` if ``policy`` allows reading it, else raise :class:`UrlRefused`."""
    shown = redact(url)
    protocol, _ = fsspec.core.split_protocol(url)
    scheme = (protocol or "").lower()
    if scheme in LOCAL_SCHEMES:
        return _check_local(url, field_name=field_name, manifest_url=manifest_url, policy=policy, shown=shown)
    if scheme not in policy.allowed_schemes:
        allowed = ", ".join(sorted(policy.allowed_schemes))
        raise UrlRefused(
            f"{field_name}: scheme {scheme!r} of {shown} is not allowed (allowed: {allowed}); "
            "copy the input to an allowed store or ask the operator to allow the scheme"
        )
    parts = urlsplit(url)
    if parts.username or parts.password:
        raise UrlRefused(
            f"{field_name}: {shown} embeds credentials; remove them and configure the store's "
            "credentials in the environment instead"
        )
    if scheme in ("http", "https"):
        _check_host(parts.hostname or "", field_name=field_name, policy=policy, shown=shown)
    if policy.allowed_prefixes and not any(url.startswith(p) for p in policy.allowed_prefixes):
        raise UrlRefused(
            f"{field_name}: {shown} is outside the allowed prefixes ({', '.join(policy.allowed_prefixes)})"
        )
    return url


def _check_local(url: str, *, field_name: str, manifest_url: str | None, policy: UrlPolicy, shown: str) -> str:
    if "file" not in policy.allowed_schemes:
        raise UrlRefused(f"{field_name}: local file {shown} is not allowed by this deployment; use an s3:// URL")
    roots = [os.path.realpath(r) for r in policy.local_roots]
    if manifest_url is not None:
        manifest_protocol, _ = fsspec.core.split_protocol(manifest_url)
        if (manifest_protocol or "file") not in LOCAL_SCHEMES:
            raise UrlRefused(
                f"{field_name}: local file {shown} in a remote manifest ({redact(manifest_url)}); "
                "inputs of a remote manifest must be remote URLs too"
            )
        roots.append(os.path.realpath(os.path.dirname(_local_path(manifest_url)) or "."))
    # realpath follows symlinks: a link inside the root that points outside it is refused too.
    real = os.path.realpath(_local_path(url))
    if not any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in roots):
        raise UrlRefused(
            f"{field_name}: {shown} resolves to {real}, outside the manifest's folder and the allowed "
            "local roots; move the input next to the manifest or allow its folder (--allow-local-root)"
        )
    return url


def _local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def _check_host(host: str, *, field_name: str, policy: UrlPolicy, shown: str) -> None:
    host = host.lower().strip("[]")
    if not host or host in METADATA_HOSTS:
        raise UrlRefused(f"{field_name}: {shown} points at a cloud metadata service; refused")
    if host not in policy.http_hosts:
        raise UrlRefused(
            f"{field_name}: host {host!r} of {shown} is not in the allowed HTTP hosts; "
            "ask the operator to allow it (--allow-http-host) or copy the input to S3"
        )
    for address in _addresses(host):
        if address.is_link_local or str(address) in METADATA_HOSTS or address.is_multicast or address.is_unspecified:
            raise UrlRefused(
                f"{field_name}: host {host!r} of {shown} resolves to {address}, a link-local or "
                "metadata address; refused"
            )


def _addresses(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror as error:
        raise UrlRefused(f"host {host!r} does not resolve: {error}") from error
    return [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
