"""Clair v4's indexer, matcher and notifier APIs, with PSK auth.

Facts this is shaped by (Clair's OpenAPI spec and server code, tests/data/clair/README.md): PSK
auth is an HS256 JWT signed with the base64-decoded key, its ``iss`` listed in Clair's config;
``POST /indexer/api/v1/index_report`` blocks until indexed, and Clair fetches every layer itself
with the headers given; ``GET /matcher/api/v1/vulnerability_report/{digest}`` is 200 with the
report (not the spec's 201), 404 before indexing, 202 while the matcher starts.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import jwt

from mirrorgate.webhook.core.config import ClairSettings

TOKEN_LIFETIME = 300
INDEX_TIMEOUT = 900.0  # Clair answers the index request only when indexing is done
CLAIR_NOTIFIER_ISSUER = "clair-notifier"  # the iss of every request Clair's notifier signs
JWT_LEEWAY = 60


class ClairError(Exception):
    """A Clair call failed; ``kind``: auth, network, timeout, server, not_ready, index_error."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def psk_token(key: bytes, issuer: str, *, now: float | None = None) -> str:
    """An HS256 JWT as Clair's PSK auth expects: ``iss`` listed in Clair's config, short-lived."""
    issued = int(now if now is not None else time.time())
    claims = {"iss": issuer, "iat": issued, "nbf": issued - 30, "exp": issued + TOKEN_LIFETIME}
    return jwt.encode(claims, key, algorithm="HS256")


def verify_psk_token(
    token: str, key: bytes, *, issuers: tuple[str, ...], now: float | None = None
) -> bool:
    """Whether ``token`` is an HS256 JWT signed with ``key`` by one of ``issuers``, in time.

    Clair's notifier signs its webhook deliveries this way when ``auth.psk`` is configured, so a
    delivery that verifies comes from a Clair that holds mirrorgate's key. ``exp`` is required:
    a signed token without one would be valid forever.
    """
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=["HS256"],
            issuer=list(issuers),
            leeway=JWT_LEEWAY,
            options={"require": ["exp", "iss"], "verify_exp": now is None},
        )
    except (jwt.PyJWTError, OverflowError, TypeError, ValueError):
        return False
    if now is not None:  # verify against the caller's clock instead of PyJWT's
        try:
            if float(claims["exp"]) < now - JWT_LEEWAY:
                return False
            if "nbf" in claims and float(claims["nbf"]) > now + JWT_LEEWAY:
                return False
        except (OverflowError, TypeError, ValueError):
            return False
    return True


class ClairClient:
    """Clair v4's indexer, matcher and notifier APIs with PSK auth."""

    def __init__(self, settings: ClairSettings, *, timeout: float = 10.0) -> None:
        self.settings = settings
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._key: bytes | None = None
        self._key_stamp: tuple[int, int, int] | None = None
        self._token: tuple[str, float] | None = None

    @property
    def url(self) -> str:
        return self.settings.url

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _psk(self) -> bytes:
        path = Path(self.settings.psk_file)
        try:
            st = path.stat()
        except OSError as err:
            raise ClairError(
                "auth", f"cannot read scan.clair.pskFile {path}: {err.strerror or err}"
            ) from err
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if self._key is None or stamp != self._key_stamp:
            try:
                self._key = base64.b64decode(path.read_text().strip(), validate=True)
            except (OSError, ValueError) as err:
                raise ClairError(
                    "auth", f"scan.clair.pskFile {path} is not base64 (Clair's auth.psk.key format)"
                ) from err
            self._key_stamp, self._token = stamp, None
        return self._key

    def verifies(self, token: str) -> bool:
        """Whether ``token`` was signed by Clair's notifier with the shared PSK."""
        try:
            key = self._psk()
        except ClairError:
            return False
        return verify_psk_token(token, key, issuers=(CLAIR_NOTIFIER_ISSUER,))

    def _authorization(self) -> str:
        key = self._psk()
        now = time.time()
        if self._token is None or self._token[1] < now + 30:
            self._token = (psk_token(key, self.settings.issuer, now=now), now + TOKEN_LIFETIME)
        return f"Bearer {self._token[0]}"

    async def _call(
        self, method: str, url: str, *, body: Any = None, timeout: float | None = None
    ) -> tuple[int, bytes]:
        headers = {"Authorization": self._authorization()}
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = json.dumps(body).encode()
        try:
            async with self.session.request(
                method,
                url,
                headers=headers,
                data=data,
                timeout=aiohttp.ClientTimeout(total=timeout or self.timeout),
            ) as resp:
                return resp.status, await resp.read()
        except TimeoutError as err:
            raise ClairError("timeout", f"Clair at {self.url} did not answer in time") from err
        except (aiohttp.ClientError, OSError) as err:
            raise ClairError("network", f"Clair at {self.url} unreachable: {err}") from err

    def _check(self, status: int, body: bytes, what: str) -> None:
        if status in (401, 403):
            raise ClairError(
                "auth",
                f"Clair refused {what} (HTTP {status}): check "
                "scan.clair.pskFile and issuer against Clair's auth.psk",
            )
        if status == 429 or status >= 500:
            raise ClairError("server", f"Clair answered HTTP {status} to {what}")

    async def index(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """POST the manifest for indexing; returns the IndexReport once Clair is done."""
        status, body = await self._call(
            "POST",
            f"{self.url}/indexer/api/v1/index_report",
            body=manifest,
            timeout=INDEX_TIMEOUT,
        )
        if status >= 500:
            # Real Clair answers a failed layer fetch with 500 and its reason, not with a 201
            # IndexError report (claircore passes the controller's error up).
            message = _error_message(body)
            if message:
                raise ClairError(
                    "index_error", f"Clair could not index {manifest.get('hash')}: {message}"
                )
        self._check(status, body, "an index request")
        if status not in (200, 201):
            raise ClairError("server", f"Clair answered HTTP {status} to an index request")
        report = _json(body)
        if report.get("state") == "IndexError" or report.get("success") is False:
            raise ClairError(
                "index_error",
                f"Clair could not index {manifest.get('hash')}: "
                f"{report.get('err') or 'IndexError'}",
            )
        return report

    async def vulnerability_report(self, digest: str) -> dict[str, Any] | None:
        """The report, or None when Clair has not indexed ``digest``."""
        status, body = await self._call(
            "GET", f"{self.url}/matcher/api/v1/vulnerability_report/{digest}"
        )
        if status == 404:
            return None
        if status == 202:
            raise ClairError("not_ready", f"Clair's matcher at {self.url} is still starting")
        self._check(status, body, "a vulnerability report request")
        if status not in (200, 201):
            raise ClairError("server", f"Clair answered HTTP {status} to a report request")
        return _json(body)

    async def notification_page(
        self, callback: str, *, page_size: int, next_id: str | None
    ) -> dict[str, Any]:
        params = f"?page_size={page_size}" + (f"&next={next_id}" if next_id else "")
        status, body = await self._call("GET", callback + params)
        self._check(status, body, "a notification page request")
        if status != 200:
            raise ClairError("server", f"Clair answered HTTP {status} to a notification page")
        return _json(body)

    async def delete_notification(self, callback: str) -> None:
        status, body = await self._call("DELETE", callback)
        self._check(status, body, "a notification delete")


def _error_message(body: bytes) -> str:
    """The message of Clair's JSON error body ({"code", "message"}), or ""."""
    try:
        doc = json.loads(body)
    except ValueError:
        return ""
    return str(doc.get("message") or "") if isinstance(doc, dict) else ""


def _json(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except ValueError as err:
        raise ClairError("server", "Clair answered something that is not JSON") from err
    if not isinstance(doc, dict):
        raise ClairError("server", "Clair answered JSON that is not an object")
    return doc
