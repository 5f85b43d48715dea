"""The typed, validated model of the webhook's sections of ``mirrorgate.yaml``.

Loading checks the whole file at once and raises a single ``ConfigError`` that lists every problem
with its key path (``mirrors[1].mirror: ...``), so a broken config stops start-up before anything
is served. Nothing here does I/O beyond reading the file, and nothing falls back silently on a bad
value.

The deployer's sections (``registry``, ``deploy``, ``certs``) are the deployer's:
``mirrorgate.deploy.config`` validates them with this module's ``Validator`` and derives what the
webhook gets from them (mirrors when the file has no ``mirrors`` list, excluded namespaces). The
``mirrorgate`` command always loads the whole file through it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mirrorgate.webhook.core.images import (
    ImageReference,
    InvalidReferenceError,
    parse_domain,
    parse_mirror,
)

# Namespaces that are never mutated, whatever the config says: a webhook that touches kube-system
# can break the control plane, and one that touches its own namespace can lock itself out after a
# restart.
ALWAYS_EXCLUDED = ("kube-system",)
DEFAULT_OWN_NAMESPACE = "mirrorgate"
CATCH_ALL = "*"

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)

# proxy: a pull-through cache (a HEAD through it fetches the image); hosted: images are pushed to it
# by someone else, mirrorgate only reads; copy: hosted, and mirrorgate copies a missing image from
# its upstream in the background so the next pod gets the mirror.
MirrorType = Literal["proxy", "hosted", "copy"]
MIRROR_TYPES: tuple[MirrorType, ...] = ("proxy", "hosted", "copy")
DEFAULT_VERIFY_TIMEOUT = 2.0
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}

# GOOS and GOARCH values images are built for (an OCI index's platform.os/.architecture).
PLATFORM_OS = frozenset(
    {"linux", "windows", "darwin", "freebsd", "netbsd", "openbsd", "solaris", "illumos", "aix"}
)
PLATFORM_ARCH = frozenset(
    {"amd64", "arm64", "arm", "386", "ppc64le", "ppc64", "s390x", "riscv64", "mips64le", "loong64"}
)
_VARIANT = re.compile(r"^v[0-9]+$")


def platform_problem(value: Any) -> str | None:
    """Why ``value`` is not an ``os/arch[/variant]`` platform as image indexes name them, or
    None when it is one."""
    parts = value.split("/") if isinstance(value, str) else []
    if (
        len(parts) in (2, 3)
        and parts[0] in PLATFORM_OS
        and parts[1] in PLATFORM_ARCH
        and (len(parts) == 2 or _VARIANT.match(parts[2]))
    ):
        return None
    return (
        f"{value!r} is not a platform os/arch[/variant] (os one of "
        f"{', '.join(sorted(PLATFORM_OS))}; arch one of {', '.join(sorted(PLATFORM_ARCH))})"
    )


NamespaceMode = Literal["optIn", "clusterWide"]
NAMESPACE_MODES: tuple[NamespaceMode, ...] = ("optIn", "clusterWide")


class ConfigError(ValueError):
    """The config is invalid; ``problems`` holds one ``key.path: reason`` line per problem."""

    def __init__(self, problems: Iterable[str], *, source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        head = f"invalid config {source}" if source else "invalid config"
        super().__init__(head + ":\n" + "\n".join(f"  {p}" for p in self.problems))


@dataclass(frozen=True, slots=True)
class Mirror:
    """One ``mirrors[]`` entry: images from ``upstream`` are pulled from ``mirror``."""

    upstream: str  # normalised domain, optionally with a repository prefix; or "*"
    mirror: str  # host[:port][/path-prefix], as the nodes pull from it
    verify: bool = True  # confirm the mirror can serve an image before rewriting to it
    type: MirrorType = "proxy"
    # os/arch[/variant] a copy mirror (and prewarm) copies of an image index; () means all.
    platforms: tuple[str, ...] = ()

    def matches(self, ref: ImageReference) -> bool:
        if self.upstream == CATCH_ALL:
            return True
        name = ref.name
        return name == self.upstream or name.startswith(self.upstream + "/")

    @property
    def specificity(self) -> int:
        # Longest upstream wins; the catch-all loses to everything.
        return -1 if self.upstream == CATCH_ALL else len(self.upstream)

    def serves(self, ref: ImageReference) -> bool:
        """Whether ``ref`` already points at this mirror (and must not be rewritten again)."""
        return ref.name.startswith(self.mirror + "/")


@dataclass(frozen=True, slots=True)
class RegistryAccess:
    """How to reach one registry host: trust, transport and credentials (all from files)."""

    ca_file: str | None = None
    plain_http: bool = False
    username_file: str | None = None
    password_file: str | None = None
    docker_config_file: str | None = None
    # Where mirrorgate (and Clair, for layers) reach this registry when the name in image references
    # only works from the nodes: a NodePort mirror is 127.0.0.1:31000 on a node but a Service
    # inside the cluster, e.g. http://registry.docker-registry.svc:5000.
    endpoint: str | None = None


@dataclass(frozen=True, slots=True)
class RegistryClientSettings:
    timeout: float = 5.0
    max_concurrency: int = 32
    positive_ttl: float = 60.0
    negative_ttl: float = 10.0
    max_entries: int = 10_000


@dataclass(frozen=True, slots=True)
class PullSecret:
    name: str
    # "<namespace>/<name>" of the kubernetes.io/dockerconfigjson Secret copied into every namespace
    # in scope; None: mirrorgate only references the secret, someone else provides it.
    source: str | None = None
    patch_service_accounts: bool = False

    @property
    def source_namespace(self) -> str | None:
        return self.source.split("/", 1)[0] if self.source else None

    @property
    def source_name(self) -> str | None:
        return self.source.split("/", 1)[1] if self.source else None


Severity = Literal["Unknown", "Negligible", "Low", "Medium", "High", "Critical"]
SEVERITIES: tuple[Severity, ...] = ("Unknown", "Negligible", "Low", "Medium", "High", "Critical")
Action = Literal["deny", "warn", "allow"]
ACTIONS: tuple[Action, ...] = ("deny", "warn", "allow")
ScanMode = Literal["enforce", "audit"]
SCAN_MODES: tuple[ScanMode, ...] = ("enforce", "audit")
# What the gate does with a failing image whose digest already runs in the pod's namespace.
RunningAction = Literal["warn", "deny"]
RUNNING_ACTIONS: tuple[RunningAction, ...] = ("warn", "deny")


@dataclass(frozen=True, slots=True)
class AllowEntry:
    """An exception: vulnerability ``id`` is accepted in ``images`` until the end of ``until``."""

    id: str
    images: tuple[str, ...]
    until: dt.date
    reason: str


@dataclass(frozen=True, slots=True)
class ClairSettings:
    url: str
    psk_file: str
    issuer: str = "mirrorgate"


@dataclass(frozen=True, slots=True)
class EventAuth:
    """How /events/* callers prove who they are: a shared bearer token and/or a client cert."""

    token_file: str | None = None
    client_ca_file: str | None = None


@dataclass(frozen=True, slots=True)
class ScanSettings:
    clair: ClairSettings
    block_severity: Severity = "High"
    fixable_only: bool = False
    allow: tuple[AllowEntry, ...] = ()
    on_pending: Action = "deny"
    on_unavailable: Action = "warn"
    admission_budget: float = 3.0
    platforms: tuple[str, ...] = ()
    mode: ScanMode = "enforce"
    verdict_ttl: float = 600.0
    index_concurrency: int = 2
    queue_size: int = 1000
    events: EventAuth = field(default_factory=EventAuth)
    # warn: a new pod of an image already running in its namespace is admitted with a warning
    # when the image fails now (a CVE published after it was deployed); deny: judged as new.
    running: RunningAction = "warn"


@dataclass(frozen=True, slots=True)
class Namespaces:
    mode: NamespaceMode = "optIn"
    exclude: tuple[str, ...] = ALWAYS_EXCLUDED

    def excluded(self, namespace: str | None, *, own_namespace: str) -> bool:
        return namespace in self.exclude or namespace == own_namespace


@dataclass(frozen=True, slots=True)
class Config:
    mirrors: tuple[Mirror, ...] = ()
    skip: tuple[str, ...] = ()
    pull_secret: PullSecret | None = None
    namespaces: Namespaces = field(default_factory=Namespaces)
    registries: dict[str, RegistryAccess] = field(default_factory=dict)
    verify_timeout: float = DEFAULT_VERIFY_TIMEOUT
    pin_digests: bool = False
    # Kubernetes Events for rewrites, fallbacks and denials (core.events), with API access.
    events: bool = True
    registry_client: RegistryClientSettings = field(default_factory=RegistryClientSettings)
    scan: ScanSettings | None = None
    source: str | None = None
    # The document as loaded: the deployer derives the in-cluster copy of the file from it.
    raw: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)

    @property
    def needs_registry(self) -> bool:
        """Whether admission talks to registries at all (verification or digest pinning)."""
        return self.pin_digests or any(m.verify for m in self.mirrors)

    def mirror_for(self, ref: ImageReference) -> Mirror | None:
        """The most specific mirror whose upstream covers ``ref`` (the first of several for that
        upstream), or None."""
        found = self.mirrors_for(ref)
        return found[0] if found else None

    def mirrors_for(self, ref: ImageReference) -> tuple[Mirror, ...]:
        """Every mirror of the most specific upstream that covers ``ref``, in priority order
        (the order of ``mirrors``)."""
        best: list[Mirror] = []
        for m in self.mirrors:
            if not m.matches(ref):
                continue
            if not best or m.specificity > best[0].specificity:
                best = [m]
            elif m.specificity == best[0].specificity and m.upstream == best[0].upstream:
                best.append(m)
        return tuple(best)

    def mirror_serving(self, ref: ImageReference) -> Mirror | None:
        """The mirror ``ref`` already points at, if any."""
        return next((m for m in self.mirrors if m.serves(ref)), None)


def load_config(path: str | Path) -> Config:
    """Read and validate ``path``; raise ConfigError naming every bad key."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError([f"cannot read: {err.strerror or err}"], source=str(p)) from err
    return parse_config(text, source=str(p))


def parse_config(text: str, *, source: str | None = None) -> Config:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError([f"not valid YAML{where}: {problem}"], source=source) from err
    if data is None:
        data = {}
    return config_from_dict(data, source=source)


def config_from_dict(data: Any, *, source: str | None = None) -> Config:
    v = Validator()
    cfg = v.config(data)
    if v.problems:
        raise ConfigError(v.problems, source=source)
    assert cfg is not None
    return dataclasses.replace(cfg, source=source, raw=data)


TOP_LEVEL_KEYS = (
    "mirrors",
    "skip",
    "pullSecret",
    "namespaces",
    "registries",
    "verifyTimeout",
    "pinDigests",
    "events",
    "registryClient",
    "scan",
)


class Validator:
    """Walks the raw YAML, collecting problems instead of stopping at the first one."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def fail(self, path: str, reason: str) -> None:
        self.problems.append(f"{path}: {reason}" if path else reason)

    def mapping(self, value: Any, path: str, allowed: Iterable[str]) -> Mapping[str, Any] | None:
        if not isinstance(value, Mapping):
            self.fail(path or "(top level)", f"must be a mapping, got {type_name(value)}")
            return None
        allowed = tuple(allowed)
        for key in value:
            if key not in allowed:
                prefix = f"{path}." if path else ""
                self.fail(f"{prefix}{key}", f"unknown key (allowed: {', '.join(allowed)})")
        return value

    def string(self, value: Any, path: str) -> str | None:
        if not isinstance(value, str) or not value:
            self.fail(path, f"must be a non-empty string, got {type_name(value)}")
            return None
        return value

    def config(
        self,
        data: Any,
        *,
        sections: Iterable[str] = (),
        derived_mirrors: tuple[Mirror, ...] | None = None,
        own_namespaces: Iterable[str] = (),
    ) -> Config | None:
        """The webhook's sections of ``data``. A caller that owns more top-level ``sections``
        (the deployer) validates them itself and may pass what follows from them: the mirrors to
        use when ``mirrors`` is absent, and namespaces that are always excluded."""
        top = self.mapping(data, "", (*TOP_LEVEL_KEYS, *sections))
        if top is None:
            return None
        pull_secret = self.pull_secret(top.get("pullSecret"))
        namespaces = self.namespaces(top.get("namespaces", {}))
        # An explicit `mirrors` list wins over derived ones, so that the deployer and the server
        # derive the same list from the same file.
        if "mirrors" in top or derived_mirrors is None:
            mirrors = self.mirrors(top.get("mirrors", []))
        else:
            mirrors = derived_mirrors
        # mirrorgate's own namespaces are never mutated or gated: a webhook that fails closed
        # must not be able to stop its own pods or the registry's from starting.
        extra = tuple(ns for ns in dict.fromkeys(own_namespaces) if ns not in namespaces.exclude)
        if extra:
            namespaces = dataclasses.replace(namespaces, exclude=namespaces.exclude + extra)
        return Config(
            mirrors=mirrors,
            skip=self.skip(top.get("skip", [])),
            pull_secret=pull_secret,
            namespaces=namespaces,
            registries=self.registries(top.get("registries", {})),
            verify_timeout=self.duration(
                top.get("verifyTimeout", DEFAULT_VERIFY_TIMEOUT), "verifyTimeout", maximum=25.0
            ),
            pin_digests=self.boolean(top.get("pinDigests", False), "pinDigests"),
            events=self.boolean(top.get("events", True), "events"),
            registry_client=self.registry_client(top.get("registryClient", {})),
            scan=self.scan(top.get("scan")),
        )

    def choice(self, value: Any, path: str, allowed: tuple[str, ...], default: str) -> Any:
        if value not in allowed:
            self.fail(path, f"{value!r} is not one of {', '.join(allowed)}")
            return default
        return value

    def scan(self, value: Any) -> ScanSettings | None:
        if value is None:
            return None
        keys = (
            "clair",
            "blockSeverity",
            "fixableOnly",
            "allow",
            "onPending",
            "onUnavailable",
            "admissionBudget",
            "platforms",
            "mode",
            "verdictTTL",
            "indexConcurrency",
            "queueSize",
            "events",
            "running",
        )
        m = self.mapping(value, "scan", keys)
        if m is None:
            return None
        d = ScanSettings(clair=ClairSettings(url="", psk_file=""))
        clair = self.clair(m.get("clair"))
        platforms: list[str] = []
        raw_platforms = m.get("platforms", [])
        if not isinstance(raw_platforms, list):
            self.fail(
                "scan.platforms",
                f"must be a list like [linux/amd64], got {type_name(raw_platforms)}",
            )
            raw_platforms = []
        for i, p in enumerate(raw_platforms):
            text = self.string(p, f"scan.platforms[{i}]")
            if text is not None and not re.match(r"^[a-z0-9]+/[a-z0-9_]+(/[a-z0-9]+)?$", text):
                self.fail(f"scan.platforms[{i}]", f"{text!r} is not os/arch[/variant]")
            elif text is not None:
                platforms.append(text)

        def count(key: str, default: int) -> int:
            v = m.get(key, default)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                self.fail(f"scan.{key}", f"must be a positive integer, got {v!r}")
                return default
            return v

        return ScanSettings(
            clair=clair or d.clair,
            block_severity=self.choice(
                m.get("blockSeverity", d.block_severity),
                "scan.blockSeverity",
                SEVERITIES,
                d.block_severity,
            ),
            fixable_only=self.boolean(m.get("fixableOnly", False), "scan.fixableOnly"),
            allow=self.allow_entries(m.get("allow", [])),
            on_pending=self.choice(
                m.get("onPending", d.on_pending), "scan.onPending", ACTIONS, d.on_pending
            ),
            on_unavailable=self.choice(
                m.get("onUnavailable", d.on_unavailable),
                "scan.onUnavailable",
                ACTIONS,
                d.on_unavailable,
            ),
            admission_budget=self.duration(
                m.get("admissionBudget", d.admission_budget), "scan.admissionBudget", maximum=25.0
            ),
            platforms=tuple(platforms),
            mode=self.choice(m.get("mode", d.mode), "scan.mode", SCAN_MODES, d.mode),
            verdict_ttl=self.duration(m.get("verdictTTL", d.verdict_ttl), "scan.verdictTTL"),
            index_concurrency=count("indexConcurrency", d.index_concurrency),
            queue_size=count("queueSize", d.queue_size),
            events=self.event_auth(m.get("events", {})),
            running=self.choice(
                m.get("running", d.running), "scan.running", RUNNING_ACTIONS, d.running
            ),
        )

    def clair(self, value: Any) -> ClairSettings | None:
        if value is None:
            self.fail("scan.clair", "required: {url, pskFile, issuer}")
            return None
        m = self.mapping(value, "scan.clair", ("url", "pskFile", "issuer"))
        if m is None:
            return None
        for key in ("url", "pskFile"):
            if key not in m:
                self.fail(f"scan.clair.{key}", "required")
        url = self.string(m.get("url"), "scan.clair.url") if "url" in m else None
        if url is not None and not re.match(r"^https?://[^/\s]+(/\S*)?$", url):
            self.fail("scan.clair.url", f"{url!r} is not an http(s) URL")
            url = None
        psk = self.string(m.get("pskFile"), "scan.clair.pskFile") if "pskFile" in m else None
        issuer = self.string(m.get("issuer", "mirrorgate"), "scan.clair.issuer")
        if url is None or psk is None or issuer is None:
            return None
        return ClairSettings(url=url.rstrip("/"), psk_file=psk, issuer=issuer)

    def allow_entries(self, value: Any) -> tuple[AllowEntry, ...]:
        if not isinstance(value, list):
            self.fail("scan.allow", f"must be a list, got {type_name(value)}")
            return ()
        out = []
        for i, item in enumerate(value):
            path = f"scan.allow[{i}]"
            m = self.mapping(item, path, ("id", "images", "until", "reason"))
            if m is None:
                continue
            for key in ("id", "until", "reason"):
                if key not in m:
                    self.fail(f"{path}.{key}", "required (exceptions must say why and expire)")
            vid = self.string(m.get("id"), f"{path}.id") if "id" in m else None
            reason = self.string(m.get("reason"), f"{path}.reason") if "reason" in m else None
            until = m.get("until")
            if isinstance(until, str):
                try:
                    until = dt.date.fromisoformat(until)
                except ValueError:
                    until = None
            is_date = isinstance(until, dt.date) and not isinstance(until, dt.datetime)
            if "until" in m and not is_date:
                self.fail(f"{path}.until", f"{m.get('until')!r} is not a date (YYYY-MM-DD)")
                until = None
            images_raw = m.get("images", ["*"])
            images: list[str] = []
            if not isinstance(images_raw, list) or not images_raw:
                self.fail(f"{path}.images", "must be a non-empty list of globs")
            else:
                for j, g in enumerate(images_raw):
                    text = self.string(g, f"{path}.images[{j}]")
                    if text is None:
                        continue
                    problem = _glob_problem(text)
                    if problem:
                        self.fail(f"{path}.images[{j}]", f"{text!r} is not a valid glob: {problem}")
                    else:
                        images.append(text)
            if vid and reason and until:
                out.append(AllowEntry(id=vid, images=tuple(images), until=until, reason=reason))
        return tuple(out)

    def event_auth(self, value: Any) -> EventAuth:
        m = self.mapping(value, "scan.events", ("tokenFile", "clientCAFile"))
        if m is None:
            return EventAuth()
        token = m.get("tokenFile")
        ca = m.get("clientCAFile")
        return EventAuth(
            token_file=self.string(token, "scan.events.tokenFile") if token is not None else None,
            client_ca_file=self.string(ca, "scan.events.clientCAFile") if ca is not None else None,
        )

    def boolean(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            self.fail(path, f"must be true or false, got {type_name(value)}")
            return False
        return value

    def duration(self, value: Any, path: str, *, maximum: float | None = None) -> float:
        """``2s``, ``500ms``, ``1m``, ``1h`` or a number of seconds; must be positive."""
        if isinstance(value, bool):
            seconds = None
        elif isinstance(value, (int, float)):
            seconds = float(value)
        elif isinstance(value, str) and (m := _DURATION.match(value.strip())):
            seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        else:
            seconds = None
        if seconds is None or seconds <= 0:
            self.fail(path, f"{value!r} is not a positive duration (e.g. 2s, 500ms, 1m)")
            return 1.0
        if maximum is not None and seconds > maximum:
            self.fail(
                path,
                f"{value!r} is longer than {maximum:g}s, more than the API server "
                "lets a webhook take",
            )
            return maximum
        return seconds

    def registries(self, value: Any) -> dict[str, RegistryAccess]:
        if not isinstance(value, Mapping):
            self.fail(
                "registries", f"must be a mapping of host to settings, got {type_name(value)}"
            )
            return {}
        out: dict[str, RegistryAccess] = {}
        for host, entry in value.items():
            path = f"registries.{host}"
            try:
                if parse_domain(str(host)) != str(host).lower():
                    raise InvalidReferenceError(f"write it as {parse_domain(str(host))}")
            except InvalidReferenceError as err:
                self.fail(path, f"{host!r} is not a registry host[:port]: {err}")
                continue
            e = self.mapping(
                entry or {}, path, ("caFile", "plainHTTP", "auth", "dockerConfigFile", "endpoint")
            )
            if e is None:
                continue
            auth = e.get("auth")
            username_file = password_file = None
            if auth is not None:
                a = self.mapping(auth, f"{path}.auth", ("usernameFile", "passwordFile"))
                if a is not None:
                    for key in ("usernameFile", "passwordFile"):
                        if key not in a:
                            self.fail(f"{path}.auth.{key}", "required")
                    username_file = self.string(a.get("usernameFile"), f"{path}.auth.usernameFile")
                    password_file = self.string(a.get("passwordFile"), f"{path}.auth.passwordFile")
            docker_config = e.get("dockerConfigFile")
            if docker_config is not None:
                docker_config = self.string(docker_config, f"{path}.dockerConfigFile")
            if auth is not None and docker_config is not None:
                self.fail(path, "set either auth or dockerConfigFile, not both")
            plain = self.boolean(e.get("plainHTTP", False), f"{path}.plainHTTP")
            ca_file = e.get("caFile")
            if ca_file is not None:
                ca_file = self.string(ca_file, f"{path}.caFile")
                if plain:
                    self.fail(f"{path}.caFile", "has no effect with plainHTTP: true")
            endpoint = e.get("endpoint")
            if endpoint is not None:
                endpoint = self.string(endpoint, f"{path}.endpoint")
                if endpoint and not re.match(r"^https?://[^/\s]+$", endpoint.rstrip("/")):
                    self.fail(f"{path}.endpoint", f"{endpoint!r} is not http(s)://host[:port]")
                    endpoint = None
            out[str(host).lower()] = RegistryAccess(
                endpoint=endpoint.rstrip("/") if endpoint else None,
                ca_file=ca_file,
                plain_http=plain,
                username_file=username_file,
                password_file=password_file,
                docker_config_file=docker_config,
            )
        return out

    def registry_client(self, value: Any) -> RegistryClientSettings:
        keys = ("timeout", "maxConcurrency", "positiveTTL", "negativeTTL", "maxEntries")
        m = self.mapping(value, "registryClient", keys)
        if m is None:
            return RegistryClientSettings()
        d = RegistryClientSettings()

        def count(key: str, default: int) -> int:
            v = m.get(key, default)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                self.fail(f"registryClient.{key}", f"must be a positive integer, got {v!r}")
                return default
            return v

        return RegistryClientSettings(
            timeout=self.duration(m.get("timeout", d.timeout), "registryClient.timeout"),
            max_concurrency=count("maxConcurrency", d.max_concurrency),
            positive_ttl=self.duration(
                m.get("positiveTTL", d.positive_ttl), "registryClient.positiveTTL"
            ),
            negative_ttl=self.duration(
                m.get("negativeTTL", d.negative_ttl), "registryClient.negativeTTL"
            ),
            max_entries=count("maxEntries", d.max_entries),
        )

    def mirrors(self, value: Any) -> tuple[Mirror, ...]:
        if not isinstance(value, list):
            self.fail("mirrors", f"must be a list, got {type_name(value)}")
            return ()
        out: list[Mirror] = []
        seen: dict[tuple[str, str], str] = {}
        for i, item in enumerate(value):
            path = f"mirrors[{i}]"
            m = self.mapping(item, path, ("upstream", "mirror", "verify", "type", "platforms"))
            if m is None:
                continue
            for key in ("upstream", "mirror"):
                if key not in m:
                    self.fail(f"{path}.{key}", "required")
            upstream = (
                self.upstream(m.get("upstream"), f"{path}.upstream") if "upstream" in m else None
            )
            # One mirror, or several in priority order: tried in that order at admission.
            raw = m.get("mirror")
            if isinstance(raw, list):
                if not raw:
                    self.fail(f"{path}.mirror", "an empty list: name at least one mirror")
                locations = [self.mirror(r, f"{path}.mirror[{j}]") for j, r in enumerate(raw)]
            else:
                locations = [self.mirror(raw, f"{path}.mirror")] if "mirror" in m else []
            verify = self.boolean(m.get("verify", True), f"{path}.verify")
            mtype = m.get("type", "proxy")
            if mtype not in MIRROR_TYPES:
                self.fail(f"{path}.type", f"{mtype!r} is not one of {', '.join(MIRROR_TYPES)}")
                mtype = "proxy"
            platforms = self.platforms(m.get("platforms", []), f"{path}.platforms")
            if upstream is None:
                continue
            for j, mirror in enumerate(locations):
                if mirror is None:
                    continue
                where = f"{path}.mirror[{j}]" if isinstance(raw, list) else f"{path}.mirror"
                if (upstream, mirror) in seen:
                    self.fail(
                        where,
                        f"{mirror!r} is already listed for {upstream!r} by "
                        f"{seen[(upstream, mirror)]}",
                    )
                    continue
                seen[(upstream, mirror)] = where
                out.append(
                    Mirror(
                        upstream=upstream,
                        mirror=mirror,
                        verify=verify,
                        type=mtype,
                        platforms=platforms,
                    )
                )
        return tuple(out)

    def platforms(self, value: Any, path: str) -> tuple[str, ...]:
        """``os/arch[/variant]`` strings as OCI image indexes name them."""
        if not isinstance(value, list):
            self.fail(
                path, f"must be a list like [linux/amd64, linux/arm64], got {type_name(value)}"
            )
            return ()
        out: list[str] = []
        for j, item in enumerate(value):
            problem = platform_problem(item)
            if problem is not None:
                self.fail(f"{path}[{j}]", problem)
                continue
            if item in out:
                self.fail(f"{path}[{j}]", f"{item!r} is listed twice")
                continue
            out.append(item)
        return tuple(out)

    def upstream(self, value: Any, path: str) -> str | None:
        text = self.string(value, path)
        if text is None:
            return None
        if text == CATCH_ALL:
            return text
        domain, _, prefix = text.partition("/")
        try:
            domain = parse_domain(domain)
        except InvalidReferenceError as err:
            self.fail(path, f"{text!r} is not a registry domain[/path]: {err}")
            return None
        if prefix:
            try:
                # Validate the repository prefix with the same grammar as a mirror's prefix.
                _, prefix = parse_mirror(f"{domain}/{prefix}")
            except InvalidReferenceError as err:
                self.fail(path, f"{text!r} has an invalid repository prefix: {err}")
                return None
        return f"{domain}/{prefix}" if prefix else domain

    def mirror(self, value: Any, path: str) -> str | None:
        text = self.string(value, path)
        if text is None:
            return None
        try:
            domain, prefix = parse_mirror(text)
        except InvalidReferenceError as err:
            self.fail(path, f"{text!r}: {err}")
            return None
        return f"{domain}/{prefix}" if prefix else domain

    def skip(self, value: Any) -> tuple[str, ...]:
        if not isinstance(value, list):
            self.fail("skip", f"must be a list of globs, got {type_name(value)}")
            return ()
        out = []
        for i, item in enumerate(value):
            path = f"skip[{i}]"
            text = self.string(item, path)
            if text is None:
                continue
            reason = _glob_problem(text)
            if reason:
                self.fail(path, f"{text!r} is not a valid glob: {reason}")
                continue
            out.append(text)
        return tuple(out)

    def pull_secret(self, value: Any) -> PullSecret | None:
        if value is None:
            return None
        m = self.mapping(value, "pullSecret", ("name", "source", "patchServiceAccounts"))
        if m is None:
            return None
        if "name" not in m:
            self.fail("pullSecret.name", "required")
            return None
        name = self.string(m["name"], "pullSecret.name")
        if name is None:
            return None
        if len(name) > 253 or not _DNS1123_SUBDOMAIN.match(name):
            self.fail(
                "pullSecret.name",
                f"{name!r} is not a valid Secret name (lowercase RFC 1123 subdomain, at most 253)",
            )
            return None
        source = m.get("source")
        if source is not None:
            text = self.string(source, "pullSecret.source")
            ns, sep, sname = (text or "").partition("/")
            if text is not None and (
                not sep or not _DNS1123_LABEL.match(ns) or not _DNS1123_SUBDOMAIN.match(sname)
            ):
                self.fail("pullSecret.source", f"{text!r} is not <namespace>/<secret name>")
                text = None
            source = text
        patch = self.boolean(
            m.get("patchServiceAccounts", False), "pullSecret.patchServiceAccounts"
        )
        if patch and source is None:
            self.fail("pullSecret.patchServiceAccounts", "needs pullSecret.source")
        return PullSecret(name=name, source=source, patch_service_accounts=patch)

    def namespaces(self, value: Any) -> Namespaces:
        m = self.mapping(value, "namespaces", ("mode", "exclude"))
        if m is None:
            return Namespaces()
        mode = m.get("mode", "optIn")
        if mode not in NAMESPACE_MODES:
            self.fail("namespaces.mode", f"{mode!r} is not one of {', '.join(NAMESPACE_MODES)}")
            mode = "optIn"
        raw = m.get("exclude", [])
        exclude: list[str] = list(ALWAYS_EXCLUDED)
        if not isinstance(raw, list):
            self.fail(
                "namespaces.exclude", f"must be a list of namespace names, got {type_name(raw)}"
            )
            raw = []
        for i, item in enumerate(raw):
            path = f"namespaces.exclude[{i}]"
            name = self.string(item, path)
            if name is None:
                continue
            if not _DNS1123_LABEL.match(name):
                self.fail(
                    path, f"{name!r} is not a valid namespace name (lowercase RFC 1123 label)"
                )
                continue
            if name not in exclude:
                exclude.append(name)
        return Namespaces(mode=mode, exclude=tuple(exclude))

    # --- registry, deploy, certs (the deployer's sections) --------------------------------------
    def image(self, value: Any, path: str) -> str | None:
        text = self.string(value, path)
        if text is not None and any(c.isspace() for c in text):
            self.fail(path, f"{text!r} is not an image reference")
            return None
        return text

    def integer(self, value: Any, path: str, *, low: int, high: int) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.fail(path, f"must be an integer from {low} to {high}, got {value!r}")
            return None
        return value

    def dns_label(self, value: Any, path: str, *, max_len: int = 63) -> str | None:
        text = self.string(value, path)
        if text is not None and (len(text) > max_len or not _DNS1123_LABEL.match(text)):
            self.fail(path, f"{text!r} is not a lowercase RFC 1123 label of at most {max_len}")
            return None
        return text

    def dns_name(self, value: Any, path: str) -> str | None:
        text = self.string(value, path)
        if text is not None and (len(text) > 253 or not _DNS1123_SUBDOMAIN.match(text)):
            self.fail(path, f"{text!r} is not a lowercase DNS name (RFC 1123 subdomain)")
            return None
        return text

    def url(self, value: Any, path: str) -> str | None:
        text = self.string(value, path)
        if text is not None and not re.match(r"^https?://[^/\s@]+(/\S*)?$", text):
            self.fail(path, f"{text!r} is not an http(s) URL (credentials in it are not allowed)")
            return None
        return text.rstrip("/") if text else None


def _glob_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not a usable fnmatch glob, or None.

    fnmatch never raises: it silently treats an unclosed ``[`` as a literal, so a typo would make a
    skip
    rule match nothing. Reject what would surprise the user instead.
    """
    if pattern != pattern.strip() or any(c.isspace() for c in pattern):
        return "contains whitespace"
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "[":
            # fnmatch: "[!...]" negates, and a "]" right after "[" or "[!" is a literal member.
            j = i + 1
            if pattern[j : j + 1] == "!":
                j += 1
            if pattern[j : j + 1] == "]":
                j += 1
            end = pattern.find("]", j)
            if end == -1:
                return f"unclosed '[' at position {i + 1}"
            i = end
        elif c == "]":
            return f"unmatched ']' at position {i + 1}"
        i += 1
    return None


def type_name(value: Any) -> str:
    """How a problem names what it found: 'a mapping', 'a string', 'nothing'."""
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )
