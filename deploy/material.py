"""The deployer's secrets: which to keep, which to generate, and the names they live under.

A second ``deploy apply`` must change nothing, so every secret already in the cluster is reused
when it is still right: the registry password (unless ``registry.auth.passwordFile`` says
otherwise), its bcrypt hash (a new salt would rewrite the Secret on every run), the registry's
shared ``http.secret``, the events token and the webhook's certificates (renewed or rotated only
when ``certs.rotation.plan`` says they are due). Values are never logged or put in messages.
"""

from __future__ import annotations

import base64
import datetime as dt
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import bcrypt

from mirrorgate.certs.pki import service_names
from mirrorgate.certs.rotation import CA_BUNDLE, RenewalPolicy, TLSMaterial, plan
from mirrorgate.deploy.config import DeployConfig, DeploySettings
from mirrorgate.webhook.core.config import ConfigError

CREDENTIALS_SECRET = "registry-credentials"  # username + password: kept by --keep-data
HTPASSWD_SECRET = "registry-auth"
REGISTRY_SECRET = "registry-secrets"  # http.secret and the notification endpoint (with token)
PasswordSource = Literal["file", "kept", "generated"]


def events_secret_name(release: str) -> str:
    return f"{release}-events"


def registry_auth_secret_name(release: str) -> str:
    """The webhook's own copy of the pull secret (a Secret cannot be mounted across namespaces)."""
    return f"{release}-registry-auth"


def deploy_settings(config: DeployConfig) -> DeploySettings:
    return config.deploy or DeploySettings()


@dataclass(frozen=True, slots=True)
class Existing:
    """The deployer's Secrets as the cluster has them (None: absent)."""

    credentials: Mapping[str, Any] | None = None
    htpasswd: Mapping[str, Any] | None = None
    registry: Mapping[str, Any] | None = None
    events: Mapping[str, Any] | None = None
    tls: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Material:
    """Every secret value the manifests need. ``repr`` shows none of them."""

    username: str = ""
    password: str = field(default="", repr=False)
    htpasswd: str = field(default="", repr=False)
    http_secret: str = field(default="", repr=False)
    events_token: str | None = field(default=None, repr=False)
    tls: TLSMaterial | None = field(default=None, repr=False)
    password_source: PasswordSource = "generated"
    tls_changes: tuple[str, ...] = ()
    # The CA bundle the registry trusts for notifications: ours, or cert-manager's ca.crt.
    ca_bundle: bytes = b""


def secret_value(secret: Mapping[str, Any] | None, key: str) -> str | None:
    if not secret:
        return None
    raw = (secret.get("data") or {}).get(key)
    if not isinstance(raw, str):
        return None
    try:
        return base64.b64decode(raw).decode()
    except (ValueError, UnicodeDecodeError):
        return None


def read_password_file(config: DeployConfig) -> str | None:
    """The password from ``registry.auth.passwordFile`` if that file exists (relative to the
    config file), else None. An empty or unreadable file is an error, not a fallback."""
    assert config.registry is not None
    name = config.registry.auth.password_file
    if not name:
        return None
    path = Path(name)
    if not path.is_absolute() and config.source:
        path = Path(config.source).parent / path
    if not path.exists():
        return None
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as err:
        problem = f"cannot read {path}: {err.strerror or err}"
        raise ConfigError([f"registry.auth.passwordFile: {problem}"]) from err
    if not text:
        raise ConfigError([f"registry.auth.passwordFile: {path} is empty"])
    if any(c.isspace() for c in text):
        raise ConfigError([f"registry.auth.passwordFile: {path} holds whitespace inside"])
    return text


def serving_names(config: DeployConfig, *, webhook_url_host: str | None = None) -> list[str]:
    d = deploy_settings(config)
    names = service_names(d.name, d.namespace)
    if webhook_url_host and webhook_url_host not in names:
        names.append(webhook_url_host)
    return names


def renewal_policy(config: DeployConfig) -> RenewalPolicy:
    c = config.certs
    return RenewalPolicy.from_seconds(
        ca=c.ca_duration, serving=c.serving_duration, overlap=c.rotation_overlap
    )


def decide(
    config: DeployConfig,
    existing: Existing,
    *,
    names: Sequence[str],
    now: dt.datetime | None = None,
    password: str | None = None,
) -> Material:
    """Keep what is right, generate what is missing. ``password``: from passwordFile, if any."""
    username, pw, htpasswd = "", "", ""
    source: PasswordSource = "generated"
    http_secret = ""
    events_token = None
    if config.registry is not None:
        auth = config.registry.auth
        username = auth.username
        kept_user = secret_value(existing.credentials, "username")
        kept_pw = secret_value(existing.credentials, "password")
        if password:
            pw, source = password, "file"
        elif kept_pw and kept_user == username:
            pw, source = kept_pw, "kept"
        else:
            pw, source = secrets.token_urlsafe(24), "generated"
        htpasswd = _htpasswd(
            username, pw, cost=auth.bcrypt_cost, kept=secret_value(existing.htpasswd, "htpasswd")
        )
        http_secret = secret_value(existing.registry, "http-secret") or secrets.token_hex(32)
    if config.scan is not None:
        events_token = secret_value(existing.events, "token") or secrets.token_urlsafe(32)
    tls = None
    changes: tuple[str, ...] = ()
    if config.certs.mode == "builtin":
        current = TLSMaterial.from_secret(existing.tls)
        step = plan(current, names=list(names), policy=renewal_policy(config), now=now)
        tls = step.material if step else current
        changes = step.reasons if step else ()
        ca_bundle = tls.ca_bundle if tls else b""
    else:
        # cert-manager writes ca.crt into the serving Secret; empty until it has issued.
        ca_bundle = (secret_value(existing.tls, CA_BUNDLE) or "").encode()
    return Material(
        username=username,
        password=pw,
        htpasswd=htpasswd,
        http_secret=http_secret,
        events_token=events_token,
        tls=tls,
        password_source=source,
        tls_changes=changes,
        ca_bundle=ca_bundle,
    )


def _htpasswd(username: str, password: str, *, cost: int, kept: str | None) -> str:
    """``user:bcrypt`` — the kept line when it still matches, so the Secret does not churn."""
    if kept:
        line = kept.strip().splitlines()[0] if kept.strip() else ""
        user, _, hashed = line.partition(":")
        if user == username and hashed:
            try:
                if bcrypt.checkpw(password.encode(), hashed.encode()):
                    return line
            except ValueError:
                pass
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=cost)).decode()
    return f"{username}:{hashed}"
