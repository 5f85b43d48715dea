"""The deployer's sections of ``mirrorgate.yaml`` (``registry``, ``deploy``, ``certs``) and the
whole file as the ``mirrorgate`` command reads it.

``DeployConfig`` is the webhook's ``Config`` plus these sections, validated together in one pass
so that one ``ConfigError`` lists every problem with its key path. What the webhook gets from
them is derived here: without a ``mirrors`` list, ``registry`` provides it (one pull-through
mirror per ``registry.proxies`` entry, at the address the nodes pull from; an explicit ``mirrors``
list wins), and the namespaces of ``registry`` and ``deploy`` are always added to
``namespaces.exclude``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mirrorgate.webhook import __version__
from mirrorgate.webhook.core.config import (
    DEFAULT_OWN_NAMESPACE,
    Config,
    ConfigError,
    Mirror,
    PullSecret,
    Validator,
    type_name,
)
from mirrorgate.webhook.core.images import InvalidReferenceError, parse_domain

# The registry image is distribution's official image, pinned: a floating "registry:2" changes
# under a running cluster.
DEFAULT_REGISTRY_IMAGE = "docker.io/library/registry:2.8.3"
DEFAULT_REGISTRY_NAMESPACE = "docker-registry"
DEFAULT_DEPLOY_NAME = "mirrorgate"
PullPath = Literal["nodePort", "ingress"]
PULL_PATHS: tuple[PullPath, ...] = ("nodePort", "ingress")
FailurePolicy = Literal["Ignore", "Fail"]
FAILURE_POLICIES: tuple[FailurePolicy, ...] = ("Ignore", "Fail")
CertMode = Literal["builtin", "cert-manager"]
CERT_MODES: tuple[CertMode, ...] = ("builtin", "cert-manager")
IssuerKind = Literal["ClusterIssuer", "Issuer"]
ISSUER_KINDS: tuple[IssuerKind, ...] = ("ClusterIssuer", "Issuer")
# The API server's default --service-node-port-range.
NODE_PORT_RANGE = (30000, 32767)
DAY = 86400.0
_LONG_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d)$")
_LONG_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": DAY}
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")
_CRON_FIELD = re.compile(r"^[0-9*/,\-A-Za-z?]+$")
DEPLOY_SECTIONS = ("registry", "deploy", "certs")


@dataclass(frozen=True, slots=True)
class RegistryProxy:
    """One pull-through cache instance: distribution mirrors exactly one upstream per instance."""

    upstream: str  # normalised registry domain, e.g. docker.io
    remote_url: str  # what the cache fetches from, e.g. https://registry-1.docker.io
    node_port: int | None = None
    host: str | None = None  # the Ingress host (pullPath: ingress); derived when not given
    # Secret in registry.namespace with keys username/password for a token-auth upstream
    # (Docker Hub): distribution sends them only to a Bearer upstream, never to a Basic one.
    credentials_secret: str | None = None

    @property
    def slug(self) -> str:
        """``docker.io`` -> ``docker-io``: names the cache's Deployment, Service and storage."""
        return re.sub(r"[^a-z0-9]+", "-", self.upstream.lower()).strip("-")


@dataclass(frozen=True, slots=True)
class FilesystemStorage:
    size: str = "20Gi"
    storage_class: str | None = None  # None: the cluster's default StorageClass


@dataclass(frozen=True, slots=True)
class S3Storage:
    bucket: str
    region: str
    region_endpoint: str | None = None
    # Secret in registry.namespace with keys accessKey and secretKey; None: the node's or
    # the pod's IAM identity.
    secret_ref: str | None = None


@dataclass(frozen=True, slots=True)
class IngressTLS:
    secret_name: str | None = None  # an existing TLS Secret, or the one cert-manager fills
    issuer: str | None = None  # cert-manager issuer: annotates the Ingress
    issuer_kind: IssuerKind = "ClusterIssuer"


@dataclass(frozen=True, slots=True)
class RegistryIngress:
    host: str
    class_name: str = "nginx"
    tls: IngressTLS = field(default_factory=IngressTLS)


@dataclass(frozen=True, slots=True)
class RegistryAuth:
    username: str = "mirrorgate"
    # A local file the deployer reads; None (or a missing file): the password kept in the
    # credentials Secret, else a generated one.
    password_file: str | None = None
    bcrypt_cost: int = 10


@dataclass(frozen=True, slots=True)
class RegistrySettings:
    """``registry:``: the registry mirrorgate deploys (one hosted instance and the caches)."""

    namespace: str = DEFAULT_REGISTRY_NAMESPACE
    image: str = DEFAULT_REGISTRY_IMAGE
    pull_path: PullPath = "nodePort"
    node_port: int | None = None
    auth: RegistryAuth = field(default_factory=RegistryAuth)
    storage: FilesystemStorage | S3Storage = field(default_factory=FilesystemStorage)
    proxies: tuple[RegistryProxy, ...] = ()
    ingress: RegistryIngress | None = None
    gc_schedule: str = "30 3 * * 0"

    @property
    def hosted_host(self) -> str:
        """Where the nodes pull pushed images from: ``127.0.0.1:<nodePort>`` or the Ingress host.

        A NodePort is reached on the node's loopback (containerd allows plain HTTP to
        localhost); ``*.svc`` names do not resolve on nodes.
        """
        if self.pull_path == "ingress" and self.ingress is not None:
            return self.ingress.host
        return f"127.0.0.1:{self.node_port}"

    def proxy_host(self, proxy: RegistryProxy) -> str:
        if self.pull_path == "ingress" and self.ingress is not None:
            return proxy.host or f"{proxy.slug}.{self.ingress.host}"
        return f"127.0.0.1:{proxy.node_port}"

    def mirrors(self) -> tuple[Mirror, ...]:
        """The ``mirrors`` this registry provides: one pull-through cache per upstream."""
        return tuple(
            Mirror(upstream=p.upstream, mirror=self.proxy_host(p), type="proxy")
            for p in self.proxies
        )

    @property
    def hosts(self) -> tuple[str, ...]:
        """Every host the nodes pull from: the hosted registry, then each cache."""
        return (self.hosted_host, *(self.proxy_host(p) for p in self.proxies))


@dataclass(frozen=True, slots=True)
class SecretMount:
    """An existing Secret of deploy.namespace mounted into the webhook (e.g. Clair's PSK)."""

    secret: str
    path: str


@dataclass(frozen=True, slots=True)
class DeploySettings:
    """``deploy:``: how the webhook itself runs in the cluster."""

    name: str = DEFAULT_DEPLOY_NAME  # names the webhook's objects and webhook configurations
    namespace: str = DEFAULT_OWN_NAMESPACE
    image: str = f"mirrorgate:{__version__}"  # built from the Dockerfile
    replicas: int = 2
    failure_policy: FailurePolicy = "Fail"  # the validating webhook's; mutating is always Ignore
    secret_mounts: tuple[SecretMount, ...] = ()


@dataclass(frozen=True, slots=True)
class CertSettings:
    """``certs:``: the webhook's serving certificate and the CA the API server trusts."""

    mode: CertMode = "builtin"
    ca_duration: float = 365 * DAY
    serving_duration: float = 90 * DAY
    # How long old and new CA are both trusted, and how long after a switch the old one stays:
    # longer than the kubelet takes to update a mounted Secret plus the server's reload check.
    rotation_overlap: float = 600.0


@dataclass(frozen=True, slots=True)
class DeployConfig(Config):
    """The whole ``mirrorgate.yaml``: what the webhook reads, and what the deployer installs."""

    registry: RegistrySettings | None = None
    deploy: DeploySettings | None = None
    certs: CertSettings = field(default_factory=CertSettings)


def load_config(path: str | Path) -> DeployConfig:
    """Read and validate ``path``; raise ConfigError naming every bad key."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError([f"cannot read: {err.strerror or err}"], source=str(p)) from err
    return parse_config(text, source=str(p))


def parse_config(text: str, *, source: str | None = None) -> DeployConfig:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError([f"not valid YAML{where}: {problem}"], source=source) from err
    return config_from_dict({} if data is None else data, source=source)


def config_from_dict(data: Any, *, source: str | None = None) -> DeployConfig:
    v = DeployValidator()
    cfg = v.deploy_config(data)
    if v.problems:
        raise ConfigError(v.problems, source=source)
    assert cfg is not None
    return dataclasses.replace(cfg, source=source, raw=data)


class DeployValidator(Validator):
    """The webhook's validator, plus the deployer's sections and the rules across them."""

    def deploy_config(self, data: Any) -> DeployConfig | None:
        top = data if isinstance(data, dict) else {}
        registry = self.registry(top.get("registry"))
        deploy = self.deploy(top.get("deploy"))
        own = [registry.namespace] if registry else []
        own += [deploy.namespace] if deploy else []
        base = self.config(
            data,
            sections=DEPLOY_SECTIONS,
            derived_mirrors=registry.mirrors() if registry is not None else None,
            own_namespaces=own,
        )
        if registry is not None and base is not None:
            self.registry_needs(registry, base.pull_secret, deploy)
        certs = self.certs(top.get("certs", {}))
        if base is None:
            return None
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(Config)}
        return DeployConfig(**fields, registry=registry, deploy=deploy, certs=certs)

    def long_duration(self, value: Any, path: str, default: float) -> float:
        """``90d``, ``2160h``, ``30m`` or ``45s``."""
        m = _LONG_DURATION.match(value.strip()) if isinstance(value, str) else None
        if m is None or float(m.group(1)) <= 0:
            self.fail(path, f"{value!r} is not a positive duration like 90d, 2160h, 10m or 30s")
            return default
        return float(m.group(1)) * _LONG_UNITS[m.group(2)]

    def registry(self, value: Any) -> RegistrySettings | None:
        if value is None:
            return None
        keys = (
            "namespace",
            "image",
            "pullPath",
            "nodePort",
            "auth",
            "storage",
            "proxies",
            "ingress",
            "gcSchedule",
        )
        m = self.mapping(value, "registry", keys)
        if m is None:
            return None
        d = RegistrySettings()
        namespace = self.dns_label(m.get("namespace", d.namespace), "registry.namespace")
        image = self.image(m.get("image", d.image), "registry.image")
        pull_path = self.choice(
            m.get("pullPath", d.pull_path), "registry.pullPath", PULL_PATHS, d.pull_path
        )
        low, high = NODE_PORT_RANGE
        node_port = None
        if "nodePort" in m:
            node_port = self.integer(m["nodePort"], "registry.nodePort", low=low, high=high)
        elif pull_path == "nodePort":
            self.fail("registry.nodePort", f"required with pullPath: nodePort ({low}-{high})")
        ingress = self.ingress(m.get("ingress")) if "ingress" in m else None
        if pull_path == "ingress" and "ingress" not in m:
            self.fail("registry.ingress", "required with pullPath: ingress ({host, tls})")
        proxies = self.proxies(m.get("proxies", []), pull_path=pull_path, hosted_port=node_port)
        schedule = self.string(m.get("gcSchedule", d.gc_schedule), "registry.gcSchedule")
        if schedule is not None:
            fields = schedule.split()
            if len(fields) != 5 or not all(_CRON_FIELD.match(f) for f in fields):
                self.fail("registry.gcSchedule", f"{schedule!r} is not a 5-field cron schedule")
        if namespace is None or image is None or schedule is None:
            return None
        return RegistrySettings(
            namespace=namespace,
            image=image,
            pull_path=pull_path,
            node_port=node_port,
            auth=self.registry_auth(m.get("auth", {})),
            storage=self.storage(m.get("storage", {"filesystem": {}})),
            proxies=proxies,
            ingress=ingress,
            gc_schedule=schedule,
        )

    def registry_auth(self, value: Any) -> RegistryAuth:
        m = self.mapping(value, "registry.auth", ("username", "passwordFile", "bcryptCost"))
        d = RegistryAuth()
        if m is None:
            return d
        username = self.string(m.get("username", d.username), "registry.auth.username")
        if username is not None and (":" in username or any(c.isspace() for c in username)):
            self.fail("registry.auth.username", "must not contain ':' or whitespace (htpasswd)")
            username = None
        password_file = m.get("passwordFile")
        if password_file is not None:
            password_file = self.string(password_file, "registry.auth.passwordFile")
        cost = self.integer(
            m.get("bcryptCost", d.bcrypt_cost), "registry.auth.bcryptCost", low=4, high=31
        )
        return RegistryAuth(
            username=username or d.username,
            password_file=password_file,
            bcrypt_cost=cost or d.bcrypt_cost,
        )

    def storage(self, value: Any) -> FilesystemStorage | S3Storage:
        m = self.mapping(value, "registry.storage", ("filesystem", "s3"))
        if m is None:
            return FilesystemStorage()
        if len(m) != 1:
            self.fail("registry.storage", "set exactly one of filesystem or s3")
            return FilesystemStorage()
        if "filesystem" in m:
            path = "registry.storage.filesystem"
            f = self.mapping(m["filesystem"] or {}, path, ("size", "storageClass"))
            if f is None:
                return FilesystemStorage()
            size = self.string(f.get("size", "20Gi"), f"{path}.size")
            if size is not None and not _QUANTITY.match(size):
                self.fail(f"{path}.size", f"{size!r} is not a storage quantity like 20Gi")
                size = None
            storage_class = f.get("storageClass")
            if storage_class is not None:
                storage_class = self.dns_name(storage_class, f"{path}.storageClass")
            return FilesystemStorage(size=size or "20Gi", storage_class=storage_class)
        path = "registry.storage.s3"
        keys = ("bucket", "region", "regionEndpoint", "secretRef")
        s3 = self.mapping(m["s3"], path, keys)
        if s3 is None:
            return FilesystemStorage()
        for key in ("bucket", "region"):
            if key not in s3:
                self.fail(f"{path}.{key}", "required")
        bucket = self.string(s3.get("bucket"), f"{path}.bucket") if "bucket" in s3 else None
        region = self.string(s3.get("region"), f"{path}.region") if "region" in s3 else None
        endpoint = s3.get("regionEndpoint")
        if endpoint is not None:
            endpoint = self.url(endpoint, f"{path}.regionEndpoint")
        secret_ref = s3.get("secretRef")
        if secret_ref is not None:
            secret_ref = self.dns_name(secret_ref, f"{path}.secretRef")
        if bucket is None or region is None:
            return FilesystemStorage()
        return S3Storage(
            bucket=bucket, region=region, region_endpoint=endpoint, secret_ref=secret_ref
        )

    def proxies(
        self, value: Any, *, pull_path: str, hosted_port: int | None
    ) -> tuple[RegistryProxy, ...]:
        if not isinstance(value, list):
            self.fail("registry.proxies", f"must be a list, got {type_name(value)}")
            return ()
        out: list[RegistryProxy] = []
        upstreams: dict[str, int] = {}
        ports: dict[int, str] = {hosted_port: "registry.nodePort"} if hosted_port else {}
        low, high = NODE_PORT_RANGE
        for i, item in enumerate(value):
            path = f"registry.proxies[{i}]"
            keys = ("upstream", "remoteURL", "nodePort", "host", "credentialsSecret")
            m = self.mapping(item, path, keys)
            if m is None:
                continue
            for key in ("upstream", "remoteURL"):
                if key not in m:
                    self.fail(f"{path}.{key}", "required")
            upstream = None
            if "upstream" in m and (text := self.string(m["upstream"], f"{path}.upstream")):
                try:
                    upstream = parse_domain(text)
                except InvalidReferenceError as err:
                    self.fail(
                        f"{path}.upstream",
                        f"{text!r}: a cache mirrors one whole registry domain: {err}",
                    )
            if upstream is not None and upstream in upstreams:
                self.fail(
                    f"{path}.upstream",
                    f"{upstream!r} is already cached by registry.proxies[{upstreams[upstream]}]"
                    " (distribution mirrors exactly one upstream per instance)",
                )
                upstream = None
            remote = self.url(m.get("remoteURL"), f"{path}.remoteURL") if "remoteURL" in m else None
            node_port = None
            if "nodePort" in m:
                node_port = self.integer(m["nodePort"], f"{path}.nodePort", low=low, high=high)
                if node_port is not None and node_port in ports:
                    self.fail(
                        f"{path}.nodePort", f"{node_port} is already used by {ports[node_port]}"
                    )
                    node_port = None
                elif node_port is not None:
                    ports[node_port] = f"{path}.nodePort"
            elif pull_path == "nodePort":
                self.fail(f"{path}.nodePort", f"required with pullPath: nodePort ({low}-{high})")
            host = self.dns_name(m["host"], f"{path}.host") if "host" in m else None
            creds = m.get("credentialsSecret")
            if creds is not None:
                creds = self.dns_name(creds, f"{path}.credentialsSecret")
            if upstream is None or remote is None:
                continue
            upstreams[upstream] = i
            out.append(
                RegistryProxy(
                    upstream=upstream,
                    remote_url=remote,
                    node_port=node_port,
                    host=host,
                    credentials_secret=creds,
                )
            )
        slugs: dict[str, str] = {}
        for p in out:
            if p.slug in slugs or p.slug == "registry":
                self.fail(
                    "registry.proxies",
                    f"{p.upstream} and {slugs.get(p.slug)} share the object name {p.slug!r}",
                )
            slugs[p.slug] = p.upstream
        return tuple(out)

    def ingress(self, value: Any) -> RegistryIngress | None:
        path = "registry.ingress"
        m = self.mapping(value, path, ("className", "host", "tls"))
        if m is None:
            return None
        if "host" not in m:
            self.fail(f"{path}.host", "required")
        host = self.dns_name(m.get("host"), f"{path}.host") if "host" in m else None
        class_name = self.dns_name(m.get("className", "nginx"), f"{path}.className")
        tls = IngressTLS()
        if "tls" not in m:
            self.fail(
                f"{path}.tls",
                "required: {secretName} or {issuer} (nodes only pull from a trusted https host)",
            )
        else:
            t = self.mapping(m["tls"], f"{path}.tls", ("secretName", "issuer", "issuerKind"))
            if t is not None:
                if "secretName" not in t and "issuer" not in t:
                    self.fail(f"{path}.tls", "set secretName, issuer (cert-manager) or both")
                secret = t.get("secretName")
                if secret is not None:
                    secret = self.dns_name(secret, f"{path}.tls.secretName")
                issuer = t.get("issuer")
                if issuer is not None:
                    issuer = self.dns_name(issuer, f"{path}.tls.issuer")
                kind = self.choice(
                    t.get("issuerKind", "ClusterIssuer"),
                    f"{path}.tls.issuerKind",
                    ISSUER_KINDS,
                    "ClusterIssuer",
                )
                tls = IngressTLS(secret_name=secret, issuer=issuer, issuer_kind=kind)
        if host is None or class_name is None:
            return None
        return RegistryIngress(host=host, class_name=class_name, tls=tls)

    def registry_needs(
        self,
        registry: RegistrySettings,
        pull_secret: PullSecret | None,
        deploy: DeploySettings | None,
    ) -> None:
        """Cross-section rules: the registry needs a pull secret the deployer can create."""
        ns = [registry.namespace] + ([deploy.namespace] if deploy else [])
        if pull_secret is None or pull_secret.source is None:
            self.fail(
                "pullSecret.source",
                f"required with registry: <namespace>/<name> in {' or '.join(ns)}, the "
                "dockerconfigjson Secret the deployer creates for the registry's hosts",
            )
        elif pull_secret.source_namespace not in ns:
            self.fail(
                "pullSecret.source",
                f"{pull_secret.source!r} must be in {' or '.join(ns)}: the deployer creates it "
                "there",
            )

    def deploy(self, value: Any) -> DeploySettings | None:
        if value is None:
            return None
        keys = ("name", "namespace", "image", "replicas", "failurePolicy", "secretMounts")
        m = self.mapping(value, "deploy", keys)
        if m is None:
            return None
        d = DeploySettings()
        # Leaves room for the longest suffix ("-registry-auth") within 63 characters.
        name = self.dns_label(m.get("name", d.name), "deploy.name", max_len=40)
        namespace = self.dns_label(m.get("namespace", d.namespace), "deploy.namespace")
        image = self.image(m.get("image", d.image), "deploy.image")
        replicas = self.integer(m.get("replicas", d.replicas), "deploy.replicas", low=1, high=50)
        policy = self.choice(
            m.get("failurePolicy", d.failure_policy),
            "deploy.failurePolicy",
            FAILURE_POLICIES,
            d.failure_policy,
        )
        mounts: list[SecretMount] = []
        raw = m.get("secretMounts", [])
        if not isinstance(raw, list):
            self.fail(
                "deploy.secretMounts",
                f"must be a list of {{secret, path}}, got {type_name(raw)}",
            )
            raw = []
        reserved = ("/etc/mirrorgate/config", "/etc/mirrorgate/tls", "/etc/mirrorgate/registry")
        for i, item in enumerate(raw):
            path = f"deploy.secretMounts[{i}]"
            sm = self.mapping(item, path, ("secret", "path"))
            if sm is None:
                continue
            secret = self.dns_name(sm.get("secret"), f"{path}.secret")
            mount = self.string(sm.get("path"), f"{path}.path")
            if mount is not None and (
                not mount.startswith("/")
                or mount.rstrip("/") in reserved
                or mount.startswith("/etc/mirrorgate/events")
            ):
                self.fail(
                    f"{path}.path",
                    f"{mount!r} must be an absolute path not used by the "
                    f"deployer ({', '.join(reserved)}, /etc/mirrorgate/events)",
                )
                mount = None
            if secret and mount:
                mounts.append(SecretMount(secret=secret, path=mount.rstrip("/")))
        if name is None or namespace is None or image is None or replicas is None:
            return None
        return DeploySettings(
            name=name,
            namespace=namespace,
            image=image,
            replicas=replicas,
            failure_policy=policy,
            secret_mounts=tuple(mounts),
        )

    def certs(self, value: Any) -> CertSettings:
        keys = ("mode", "caDuration", "servingDuration", "rotationOverlap")
        m = self.mapping(value, "certs", keys)
        d = CertSettings()
        if m is None:
            return d
        mode = self.choice(m.get("mode", d.mode), "certs.mode", CERT_MODES, d.mode)
        ca = self.long_duration(m.get("caDuration", "365d"), "certs.caDuration", d.ca_duration)
        serving = self.long_duration(
            m.get("servingDuration", "90d"), "certs.servingDuration", d.serving_duration
        )
        overlap = self.long_duration(
            m.get("rotationOverlap", "10m"), "certs.rotationOverlap", d.rotation_overlap
        )
        if serving >= ca:
            self.fail("certs.servingDuration", "must be shorter than certs.caDuration")
        if overlap * 3 > serving:
            self.fail(
                "certs.rotationOverlap",
                "must be at most a third of certs.servingDuration (renewal starts at two thirds)",
            )
        return CertSettings(
            mode=mode, ca_duration=ca, serving_duration=serving, rotation_overlap=overlap
        )
