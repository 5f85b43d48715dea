"""A minimal raw client for the real API server: JSON in, status + headers + JSON out.

The generated ``kubernetes`` client converts objects into models and hides response headers; the
admission tests need what a ``kubectl`` user sees: the stored JSON, the ``Warning`` headers and the
error message of a denial. Kubernetes 1.20's ``EphemeralContainers`` kind also has no model there.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from mirrorgate.devtools.demo import parse_warning_header


@dataclass
class Reply:
    status: int
    body: Any
    warnings: list[str]

    @property
    def message(self) -> str:
        return self.body.get("message", "") if isinstance(self.body, dict) else str(self.body)


class KubeHTTP:
    def __init__(self, url: str, token: str, ca_file: str) -> None:
        self.url = url
        self.token = token
        self.ctx = ssl.create_default_context(cafile=ca_file)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Reply:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            f"{self.url}{path}{query}",
            data=data,
            method=method,
            headers={
                "Authorization": f"Bearer {self.token}",
                "Content-Type": content_type,
                "Accept": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(req, context=self.ctx, timeout=30) as r:
                return Reply(r.status, json.loads(r.read() or b"null"), _warnings(r.headers))
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = raw.decode(errors="replace")
            return Reply(err.code, parsed, _warnings(err.headers))

    def get(self, path: str) -> Reply:
        return self.request("GET", path)

    def create_pod(self, namespace: str, pod: dict[str, Any], *, dry_run: bool = False) -> Reply:
        params = {"dryRun": "All"} if dry_run else None
        return self.request("POST", f"/api/v1/namespaces/{namespace}/pods", pod, params=params)

    def create_namespace(self, name: str, labels: dict[str, str] | None = None) -> Reply:
        reply = self.request(
            "POST", "/api/v1/namespaces", {"metadata": {"name": name, "labels": labels or {}}}
        )
        assert reply.status == 201, reply.body
        return reply


def _warnings(headers: Any) -> list[str]:
    out: list[str] = []
    for value in headers.get_all("Warning") or []:
        out.extend(parse_warning_header(value))
    return out
