"""The serving TLS context, and its reload when the certificate files change on disk.

Kubernetes updates mounted Secrets by swapping a symlink and sends no file events, so the files are
polled and compared by digest. Each check reads the pair once; a pair that parses, matches and has
not expired is loaded from those very bytes into a new ``SSLContext``, and only a complete one is
swapped in: a half-written or mismatched pair is reported and the running certificate stays, and
no handshake ever meets a context in the middle of a load.

The listening socket keeps one context for its whole life; its SNI callback (which OpenSSL calls
for every handshake, with or without a server name) hands each new connection the current one.
Connections already open keep the certificate they started with.

With ``client_ca_file`` (``scan.events.clientCAFile``) the server asks for a client certificate
and verifies it against that CA; a client without one is still served (the API server sends
none) and ``/events/*`` decide what a verified certificate may do.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import os
import ssl
from collections.abc import Callable, Iterator
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


@contextlib.contextmanager
def _as_file(data: bytes, name: str) -> Iterator[str]:
    """``data`` behind a path ``load_cert_chain`` can open, without a writable filesystem
    (the webhook's root filesystem is read-only): an anonymous memory file."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def load_pair(
    cert_file: Path, key_file: Path, *, client_ca_file: Path | None = None
) -> tuple[LoadedCertificate, ssl.SSLContext]:
    """Read the pair once and load those bytes into a new server context, or raise
    TLSConfigError saying what is wrong."""
    cert_pem = _read(cert_file, "certificate")
    key_pem = _read(key_file, "key")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as err:
        raise TLSConfigError(f"certificate {cert_file}: not a PEM certificate") from err
    ctx = new_server_context(client_ca_file=client_ca_file)
    try:
        with _as_file(cert_pem, "tls.crt") as cert_path, _as_file(key_pem, "tls.key") as key_path:
            ctx.load_cert_chain(cert_path, key_path)
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


def new_server_context(*, client_ca_file: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if client_ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=str(client_ca_file))
        except (OSError, ssl.SSLError) as err:
            raise TLSConfigError(
                f"scan.events.clientCAFile {client_ca_file}: cannot load: "
                f"{getattr(err, 'strerror', None) or getattr(err, 'reason', None) or err}"
            ) from err
        # Optional: the API server presents no certificate; one that is presented must verify.
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


class ReloadingTLS:
    """Owns the server's SSLContext and keeps it in step with the files."""

    def __init__(
        self,
        cert_file: str | Path,
        key_file: str | Path,
        *,
        client_ca_file: str | Path | None = None,
        on_load: Callable[[LoadedCertificate], None] | None = None,
        on_error: Callable[[], None] | None = None,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.cert_file = Path(cert_file)
        self.key_file = Path(key_file)
        self.client_ca_file = Path(client_ca_file) if client_ca_file else None
        self._on_load = on_load
        self._on_error = on_error
        self._now = now
        info, current = load_pair(self.cert_file, self.key_file, client_ca_file=self.client_ca_file)
        if info.not_after <= now():
            raise TLSConfigError(
                f"certificate {self.cert_file} expired at {info.not_after.isoformat()}: "
                "the API server would reject every call; issue a new one"
            )
        self.current = info
        self._current = current
        # The listener's context: never reloaded itself, it switches every handshake to the
        # current one (the verify mode stays the listener's, so it is set the same way).
        _, self.context = load_pair(
            self.cert_file, self.key_file, client_ca_file=self.client_ca_file
        )
        self.context.sni_callback = self._select
        if on_load:
            on_load(info)

    def _select(self, conn: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext) -> None:
        conn.context = self._current

    def reload_if_changed(self) -> bool:
        """Swap in the files' pair if it changed and is usable; True if swapped."""
        try:
            info, fresh = load_pair(
                self.cert_file, self.key_file, client_ca_file=self.client_ca_file
            )
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
        self._current, self.current = fresh, info  # complete before it is ever handed out
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
