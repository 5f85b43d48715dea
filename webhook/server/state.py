"""What the server's handlers and background contexts share, under typed ``web.AppKey``s."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from aiohttp import web

from mirrorgate.webhook.adapters.registry import RegistryClient
from mirrorgate.webhook.controllers.certs import CertRenewal
from mirrorgate.webhook.controllers.events import EventRecorder
from mirrorgate.webhook.controllers.leader import ElectionSettings, LeaderElector
from mirrorgate.webhook.controllers.pullsecrets import PullSecretSync
from mirrorgate.webhook.controllers.running import RunningImages
from mirrorgate.webhook.core.config import DEFAULT_OWN_NAMESPACE, Config
from mirrorgate.webhook.infra.metrics import Metrics
from mirrorgate.webhook.services.mirrors import MirrorVerifier
from mirrorgate.webhook.services.scanner import Scanner


@dataclass(frozen=True, slots=True)
class Settings:
    config: Config
    own_namespace: str = DEFAULT_OWN_NAMESPACE
    # Who writes pull-secret copies and counts kubelet pull failures: one replica at a time.
    election: ElectionSettings = field(default_factory=ElectionSettings)
    # Whether the server may use the Kubernetes API (in-cluster or a kubeconfig): namespace labels
    # for scan modes, kubelet pull-failure Events, pull-secret copies. Required for the latter.
    kubernetes: bool = False
    # Renew the serving certificate in the cluster (serve as `mirrorgate deploy` installed it).
    cert_renewal: CertRenewal | None = None
    # How long a connection may sit idle, or take over its request headers (serve --idle-timeout).
    idle_timeout: float = 30.0


# Returns the namespace's labels, or None when unknown (no namespace cache in this process).
NamespaceLabelsLookup = Callable[[str], Mapping[str, str] | None]

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
# The one registry client of the process: the verifier and the scanner share its cache, so an image
# is resolved once for both webhooks.
REGISTRY = web.AppKey("registry", RegistryClient)
VERIFIER = web.AppKey("verifier", MirrorVerifier)
PULL_SECRETS = web.AppKey("pull_secrets", PullSecretSync)
EVENTS = web.AppKey("events", EventRecorder)
RUNNING = web.AppKey("running", RunningImages)
LEADER = web.AppKey("leader", LeaderElector)
SCANNER = web.AppKey("scanner", Scanner)
NAMESPACE_LABELS: web.AppKey[NamespaceLabelsLookup] = web.AppKey("namespace_labels")
