"""The serving TLS context, and its reload when the certificate files change on disk.

Kubernetes updates mounted Secrets by swapping a symlink and sends no file events, so the files are
polled and compared by digest. A new pair is first loaded into a scratch context: a half-written or
mismatched pair is reported and the running certificate stays. The live ``SSLContext`` is then
loaded in place, which affects only new handshakes; connections already open keep the certificate
they started with.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from mirrorgate.webhook.infra.logs import get_logger

log = get_logger("tls")
DEFAULT_RELOAD_INTERVAL = 10.0


class TLSConfigError(Exception):
    """The certificate or key cannot be used; the message says which file and why."""


@dataclass(frozen=True, slots=True)
class LoadedCertificate:
    digest: str
    not_after: dt.datetime
    subject: str


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise TLSConfigError(f"{what} {path}: cannot read: {err.strerror or err}") from err


def inspect_pair(cert_file: Path, key_file: Path) -> tuple[LoadedCertificate, ssl.SSLContext]:
    """Load the pair into a fresh server context, or raise TLSConfigError saying what is wrong."""
    cert_pem = _read(cert_file, "certificate")
    key_pem = _read(key_file, "key")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as err:
        raise TLSConfigError(f"certificate {cert_file}: not a PEM certificate") from err
    ctx = new_server_context()
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as err:
        reason = err.reason or str(err)
        if "KEY_VALUES_MISMATCH" in str(err) or reason == "KEY_VALUES_MISMATCH":
            raise TLSConfigError(
                f"key {key_file} does not belong to certificate {cert_file}"
            ) from err
        # The message of a key parse failure never contains key material.
        raise TLSConfigError(f"cannot load {cert_file} / {key_file}: {reason}") from err
    digest = hashlib.sha256(cert_pem + b"\0" + key_pem).hexdigest()
    info = LoadedCertificate(
        digest=digest, not_after=cert.not_valid_after_utc, subject=cert.subject.rfc4514_string()
    )
    return info, ctx


def new_server_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class ReloadingTLS:
    """Owns the server's SSLContext and keeps it in step with the files."""

    def __init__(
        self,
        cert_file: str | Path,
        key_file: str | Path,
        *,
        on_load: Callable[[LoadedCertificate], None] | None = None,
        on_error: Callable[[], None] | None = None,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.cert_file = Path(cert_file)
        self.key_file = Path(key_file)
        self._on_load = on_load
        self._on_error = on_error
        self._now = now
        info, _ = inspect_pair(self.cert_file, self.key_file)
        if info.not_after <= now():
            raise TLSConfigError(
                f"certificate {self.cert_file} expired at {info.not_after.isoformat()}: "
                "the API server would reject every call; issue a new one"
            )
        self.context = new_server_context()
        self.context.load_cert_chain(self.cert_file, self.key_file)
        self.current = info
        if on_load:
            on_load(info)

    def reload_if_changed(self) -> bool:
        """Swap in the files' pair if it changed and is usable; True if swapped."""
        try:
            info, _ = inspect_pair(self.cert_file, self.key_file)
        except TLSConfigError as err:
            log.error(
                "certificate reload failed; still serving the previous one",
                extra={"fields": {"reason": str(err)}},
            )
            if self._on_error:
                self._on_error()
            return False
        if info.digest == self.current.digest:
            return False
        if info.not_after <= self._now():
            log.error(
                "new certificate on disk is already expired; still serving the previous one",
                extra={"fields": {"not_after": info.not_after.isoformat()}},
            )
            if self._on_error:
                self._on_error()
            return False
        # Checked above on a scratch context, so this cannot leave the live one half-loaded.
        self.context.load_cert_chain(self.cert_file, self.key_file)
        self.current = info
        log.info(
            "serving certificate reloaded",
            extra={"fields": {"subject": info.subject, "not_after": info.not_after.isoformat()}},
        )
        if self._on_load:
            self._on_load(info)
        return True

    async def watch(self, interval: float = DEFAULT_RELOAD_INTERVAL) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                self.reload_if_changed()
            except Exception:  # a reload bug must not stop the watcher or the server
                log.exception("unexpected error while checking the certificate files")
