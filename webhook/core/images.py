"""Container image references: parsing, normalisation and mirror rewriting.

This module owns the answer to "what image does this string name?".  It follows the
CNCF distribution reference grammar (github.com/distribution/reference) and its
``ParseNormalizedNamed`` normalisation, which is what the kubelet and container runtimes
apply to ``image:`` fields, so the webhook sees exactly the repository the node would pull:

* ``nginx`` -> ``docker.io/library/nginx``; ``user/app`` -> ``docker.io/user/app``;
  ``index.docker.io/...`` -> ``docker.io/...``;
* the first path component is a registry host only when it contains ``.`` or ``:``, is
  ``localhost``, or contains an upper-case letter (``Foo/bar`` is host ``Foo``);
* repository paths are lower case, at most 255 characters (the path, not the host);
* tags are ``[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}``; digests must be valid sha256, sha384 or
  sha512 digests (lower-case hex of the right length), as ``go-digest`` requires;
* a bare 64-hex-digit string is refused, because docker reads it as an image ID.

It also validates the two kinds of registry locations that appear in configuration: mirror
locations (``host[:port][/path/prefix]``) and upstream registry hosts (``host[:port]``).

Standard library only: no I/O, no framework imports.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
from dataclasses import dataclass

__all__ = [
    "ImageReference",
    "InvalidReferenceError",
    "parse_canonical",
    "parse_domain",
    "parse_mirror",
    "parse_reference",
    "with_mirror",
]

DEFAULT_DOMAIN = "docker.io"
LEGACY_DEFAULT_DOMAIN = "index.docker.io"
OFFICIAL_REPO_PREFIX = "library/"
LOCALHOST = "localhost"
REPOSITORY_PATH_MAX = 255
TAG_MAX = 128
# Longer than any reference distribution parses (a 253-character host with a port, a 255-character
# path, a 128-character tag and a sha512 digest come to about 780): refused before any pattern
# work, and never kept in a cache, so hostile megabyte-long "images" cost nothing to keep.
REFERENCE_MAX = 1024

# --- grammar (github.com/distribution/reference regexp.go) -------------------------------

_ALPHANUMERIC = r"[a-z0-9]+"
# One period, one or two underscores, or any number of dashes.
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = rf"{_ALPHANUMERIC}(?:{_SEPARATOR}{_ALPHANUMERIC})*"
_REMOTE_NAME = rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
_DOMAIN_NAME_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_NAME = rf"{_DOMAIN_NAME_COMPONENT}(?:\.{_DOMAIN_NAME_COMPONENT})*"
# Bracketed IPv6 without zone identifiers or embedded IPv4.
_IPV6_ADDRESS = r"\[(?:[a-fA-F0-9:]+)\]"
_HOST = rf"(?:{_DOMAIN_NAME}|{_IPV6_ADDRESS})"
_DOMAIN_AND_PORT = rf"{_HOST}(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*[:][0-9A-Fa-f]{32,}"
_NAME = rf"(?:{_DOMAIN_AND_PORT}/)?{_REMOTE_NAME}"

# All patterns are used with fullmatch(), the equivalent of Go's ^...$ anchoring.  re.ASCII
# makes \w mean [A-Za-z0-9_] as in RE2.  Python's backtracking picks the same submatches as
# RE2's leftmost-first semantics for these patterns.
_REFERENCE_RE = re.compile(rf"({_NAME})(?::({_TAG}))?(?:@({_DIGEST}))?", re.ASCII)
_ANCHORED_NAME_RE = re.compile(rf"(?:({_DOMAIN_AND_PORT})/)?({_REMOTE_NAME})", re.ASCII)
_IDENTIFIER_RE = re.compile(r"[a-f0-9]{64}", re.ASCII)
_DOMAIN_AND_PORT_RE = re.compile(_DOMAIN_AND_PORT, re.ASCII)
_PATH_COMPONENT_RE = re.compile(_PATH_COMPONENT, re.ASCII)
_REMOTE_NAME_RE = re.compile(_REMOTE_NAME, re.ASCII)
_TAG_RE = re.compile(_TAG, re.ASCII)
_DIGEST_RE = re.compile(_DIGEST, re.ASCII)
_HOST_PORT_RE = re.compile(rf"({_HOST})(?::([0-9]+))?", re.ASCII)

# --- go-digest ------------------------------------------------------------------------------

# Algorithms docker/containerd register, with their hex-encoded length.
_DIGEST_HEX_LENGTHS = {"sha256": 64, "sha384": 96, "sha512": 128}
_GO_DIGEST_RE = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+", re.ASCII)
_LOWER_HEX_RE = re.compile(r"[a-f0-9]+", re.ASCII)

_WHITESPACE_RE = re.compile(r"\s")
_QUOTE_LIMIT = 200
_PATH_RULE = "lowercase letters and digits separated by '.', '_', '__' or '-'"


class InvalidReferenceError(ValueError):
    """An image reference or registry location that does not parse.

    ``str(err)`` is a one-line human reason, e.g.
    ``invalid reference "Foo": repository name must be lowercase``.  ``text`` is the rejected
    input and ``reason`` the part after the colon (both ``None`` when raised with a bare
    message).
    """

    def __init__(self, message: str, *, text: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.text = text
        self.reason = reason


def _quote(text: str) -> str:
    """Quote ``text`` on one line (control characters escaped), shortening huge inputs."""
    if len(text) <= _QUOTE_LIMIT:
        return json.dumps(text)
    return f'{json.dumps(text[:_QUOTE_LIMIT])[:-1]}..." ({len(text)} characters)'


def _invalid(kind: str, text: str, reason: str) -> InvalidReferenceError:
    return InvalidReferenceError(
        f"invalid {kind} {_quote(text)}: {reason}", text=text, reason=reason
    )


@dataclass(frozen=True, slots=True)
class ImageReference:
    """A normalised image reference: ``domain/path[:tag][@digest]``."""

    domain: str
    """Registry host[:port] as normalised: ``docker.io``, ``ghcr.io``, ``[::1]:5000``."""
    path: str
    """Repository path without the domain: ``library/nginx``, ``org/app``."""
    tag: str | None = None
    """Tag as written; ``None`` when absent (no implicit ``latest``)."""
    digest: str | None = None
    """``algorithm:hex`` digest, ``None`` when absent."""

    @property
    def name(self) -> str:
        """Repository name including the domain: ``docker.io/library/nginx``."""
        return f"{self.domain}/{self.path}"

    def __str__(self) -> str:
        return self.name + _suffix(self)

    @property
    def familiar(self) -> str:
        """Docker's short form: ``nginx:1.25``, ``user/app``, ``ghcr.io/x/y@sha256:...``."""
        if self.domain != DEFAULT_DOMAIN:
            return str(self)
        name = self.path
        if name.startswith(OFFICIAL_REPO_PREFIX):
            rest = name[len(OFFICIAL_REPO_PREFIX) :]
            if "/" not in rest:
                name = rest
        return name + _suffix(self)


def _suffix(ref: ImageReference) -> str:
    tag = f":{ref.tag}" if ref.tag is not None else ""
    digest = f"@{ref.digest}" if ref.digest is not None else ""
    return tag + digest


# --- parsing --------------------------------------------------------------------------------


def _split_docker_domain(text: str) -> tuple[str, str]:
    """Split ``text`` into (domain, remainder) the way docker decides what a host is."""
    maybe_domain, slash, maybe_remainder = text.partition("/")
    if not slash:
        # A single component is always a Docker Hub official image ("localhost:5000" is
        # the image "localhost" with tag "5000").
        return DEFAULT_DOMAIN, OFFICIAL_REPO_PREFIX + text
    if maybe_domain == LOCALHOST:
        domain, remainder = maybe_domain, maybe_remainder
    elif maybe_domain == LEGACY_DEFAULT_DOMAIN:
        domain, remainder = DEFAULT_DOMAIN, maybe_remainder
    elif "." in maybe_domain or ":" in maybe_domain:
        domain, remainder = maybe_domain, maybe_remainder
    elif maybe_domain.lower() != maybe_domain:
        # Namespaces are lower case, so an upper-case first component must be a host.
        domain, remainder = maybe_domain, maybe_remainder
    else:
        domain, remainder = DEFAULT_DOMAIN, text
    if domain == DEFAULT_DOMAIN and "/" not in remainder:
        remainder = OFFICIAL_REPO_PREFIX + remainder
    return domain, remainder


def _check_digest(digest: str) -> str | None:
    """go-digest validation of a grammar-valid digest: ``None`` if fine, else a reason."""
    algorithm, _, encoded = digest.partition(":")
    expected = _DIGEST_HEX_LENGTHS.get(algorithm)
    if expected is None:
        if not _GO_DIGEST_RE.fullmatch(digest):
            return f"invalid checksum digest format in {_quote(digest)}"
        supported = ", ".join(_DIGEST_HEX_LENGTHS)
        return f"unsupported digest algorithm {_quote(algorithm)} (supported: {supported})"
    if len(encoded) != expected:
        return (
            f"invalid checksum digest length: {algorithm} needs {expected} hex digits, "
            f"got {len(encoded)}"
        )
    if not _LOWER_HEX_RE.fullmatch(encoded):
        return f"invalid checksum digest format: {algorithm} digests are lowercase hex"
    return None


def _explain_format(candidate: str) -> str:
    """Best-effort reason why ``candidate`` (``domain/remainder``) fails the grammar."""
    name_and_tag, at, digest = candidate.partition("@")
    if at:
        if not digest:
            return "digest is empty after '@'"
        if "@" in digest:
            return "more than one '@'"
        if not _DIGEST_RE.fullmatch(digest):
            return f"digest {_quote(digest)} is not algorithm:hex with at least 32 hex digits"
    after_domain = name_and_tag.partition("/")[2]
    if "[" in after_domain or "]" in after_domain:
        return (
            "an IPv6 address must be a bracketed registry host followed by '/repository', "
            "like [::1]:5000/app"
        )
    name = name_and_tag
    colon = name_and_tag.rfind(":")
    if colon > name_and_tag.rfind("/"):
        name, tag = name_and_tag[:colon], name_and_tag[colon + 1 :]
        if not tag:
            return "tag is empty after ':'"
        if len(tag) > TAG_MAX:
            return f"tag is {len(tag)} characters, more than {TAG_MAX}"
        if not _TAG_RE.fullmatch(tag):
            return (
                f"tag {_quote(tag)} must be letters, digits, '_', '.' or '-' and not start "
                "with '.' or '-'"
            )
    domain, _, path = name.partition("/")
    if not _DOMAIN_AND_PORT_RE.fullmatch(domain):
        return f"registry host {_quote(domain)} is not a valid host[:port]"
    for component in path.split("/"):
        if not component:
            return "repository path has an empty component (leading, trailing or double '/')"
        if not _PATH_COMPONENT_RE.fullmatch(component):
            return f"path component {_quote(component)} must be {_PATH_RULE}"
    return "invalid reference format"


@functools.lru_cache(maxsize=4096)
def parse_reference(text: str) -> ImageReference:
    """Parse and normalise an image reference with ``ParseNormalizedNamed`` semantics.

    Raises InvalidReferenceError naming the reason when ``text`` is not a reference the
    container runtime would accept.
    """
    if not text:
        raise _invalid("reference", text, "reference is empty")
    if len(text) > REFERENCE_MAX:
        raise _invalid(
            "reference", text, f"no image reference is longer than {REFERENCE_MAX} characters"
        )
    if _WHITESPACE_RE.search(text):
        raise _invalid("reference", text, "must not contain whitespace")
    if _IDENTIFIER_RE.fullmatch(text):
        raise _invalid(
            "reference",
            text,
            "cannot specify 64-byte hexadecimal strings (that is an image ID, not a name)",
        )

    domain, remainder = _split_docker_domain(text)
    remote = remainder.partition(":")[0]
    if remote.lower() != remote:
        raise _invalid("reference", text, "repository name must be lowercase")

    candidate = f"{domain}/{remainder}"
    match = _REFERENCE_RE.fullmatch(candidate)
    if match is None:
        lowered = candidate.lower()
        if lowered != candidate and _REFERENCE_RE.fullmatch(lowered):
            raise _invalid("reference", text, "repository name must be lowercase")
        raise _invalid("reference", text, _explain_format(candidate))

    name, tag, digest = match.groups()
    name_match = _ANCHORED_NAME_RE.fullmatch(name)
    assert name_match is not None  # the reference pattern embeds the name pattern
    parsed_domain, path = name_match.groups()
    if parsed_domain != domain:
        # distribution would accept e.g. "foo_bar.com/app" as a name with no registry at
        # all; that names nothing a node can pull from, so refuse it.
        raise _invalid(
            "reference",
            text,
            f"registry host {_quote(domain)} is not a valid host[:port]",
        )
    if len(path) > REPOSITORY_PATH_MAX:
        raise _invalid(
            "reference",
            text,
            f"repository name must not be more than {REPOSITORY_PATH_MAX} characters "
            f"(the path is {len(path)})",
        )
    if digest is not None:
        problem = _check_digest(digest)
        if problem is not None:
            raise _invalid("reference", text, problem)
    return ImageReference(domain=domain, path=path, tag=tag, digest=digest)


def parse_canonical(text: str) -> ImageReference:
    """Parse a reference that must already be in normalised form (``ParseNamed``).

    ``docker.io/library/nginx:1.25`` passes; ``nginx:1.25`` and ``docker.io/nginx`` do not.
    """
    ref = parse_reference(text)
    if str(ref) != text:
        raise _invalid(
            "reference",
            text,
            f"repository name must be canonical (normalised form is {_quote(str(ref))})",
        )
    return ref


# --- registry locations -----------------------------------------------------------------


def _check_host(kind: str, text: str, host: str) -> None:
    """Validate a ``host[:port]`` taken from configuration.

    Stricter than the reference grammar where the grammar is loose: ports must be 1-65535
    and bracketed IPv6 must be a real address.  Also insists the host is one docker would
    recognise as a registry rather than a Docker Hub namespace.
    """
    if not host:
        raise _invalid(kind, text, "registry host is empty")
    match = _HOST_PORT_RE.fullmatch(host)
    if match is None:
        if "%" in host:
            reason = "IPv6 zone identifiers are not allowed"
        elif host.startswith("[") and "]" not in host:
            reason = "IPv6 address is missing its closing ']'"
        elif ":" in host and not host.startswith("[") and host.count(":") > 1:
            reason = "IPv6 addresses must be written in brackets, like [::1]:5000"
        else:
            reason = f"registry host {_quote(host)} is not a valid host[:port]"
        raise _invalid(kind, text, reason)
    hostname, port = match.groups()
    if port is not None and not 1 <= int(port) <= 65535:
        raise _invalid(kind, text, f"port {port} is outside 1-65535")
    if hostname.startswith("["):
        try:
            ipaddress.IPv6Address(hostname[1:-1])
        except ValueError:
            raise _invalid(kind, text, f"{_quote(hostname)} is not a valid IPv6 address") from None
    if port is None and "." not in hostname and ":" not in hostname and hostname != LOCALHOST:
        raise _invalid(
            kind,
            text,
            f"{_quote(hostname)} would be read as a Docker Hub namespace; a registry host "
            "needs a '.', a ':port', or to be 'localhost'",
        )


def _check_location_syntax(kind: str, text: str, shape: str) -> None:
    if not text:
        raise _invalid(kind, text, f"{kind} is empty")
    if _WHITESPACE_RE.search(text):
        raise _invalid(kind, text, "must not contain whitespace")
    if "://" in text:
        raise _invalid(kind, text, f"must be {shape} without a scheme")
    if "@" in text:
        raise _invalid(kind, text, f"must be {shape} without a digest")


def parse_mirror(text: str) -> tuple[str, str]:
    """Validate a mirror location ``host[:port][/path/prefix]``; return ``(domain, prefix)``.

    ``prefix`` is ``''`` when absent.  The host keeps the case it was written in, since the
    mirror is emitted verbatim by with_mirror.  Raise InvalidReferenceError with the reason.
    """
    shape = "host[:port][/path-prefix]"
    _check_location_syntax("mirror", text, shape)
    if text.endswith("/"):
        raise _invalid("mirror", text, "must not end with '/'")
    host, _, prefix = text.partition("/")
    _check_host("mirror", text, host)
    if host == LEGACY_DEFAULT_DOMAIN:
        raise _invalid(
            "mirror", text, f"{LEGACY_DEFAULT_DOMAIN} is normalised to docker.io; write docker.io"
        )
    if prefix:
        for component in prefix.split("/"):
            if not component:
                raise _invalid("mirror", text, "path prefix has an empty component ('//')")
            if ":" in component:
                raise _invalid("mirror", text, f"must be {shape} without a tag")
            if not _PATH_COMPONENT_RE.fullmatch(component):
                if _PATH_COMPONENT_RE.fullmatch(component.lower()):
                    raise _invalid("mirror", text, "path prefix must be lowercase")
                raise _invalid(
                    "mirror",
                    text,
                    f"path prefix component {_quote(component)} must be {_PATH_RULE}",
                )
    return host, prefix


def parse_domain(text: str) -> str:
    """Validate an upstream registry ``host[:port]`` and return it lower-cased.

    ``index.docker.io`` normalises to ``docker.io`` (as distribution does); nothing else is
    rewritten.  Raise InvalidReferenceError on schemes, paths, blanks and bad hosts.
    """
    shape = "host[:port]"
    _check_location_syntax("registry domain", text, shape)
    if "/" in text:
        raise _invalid("registry domain", text, f"must be {shape} without a path")
    host = text.lower()
    _check_host("registry domain", text, host)
    return DEFAULT_DOMAIN if host == LEGACY_DEFAULT_DOMAIN else host


@functools.lru_cache(maxsize=4096)
def with_mirror(ref: ImageReference, mirror: str) -> str:
    """Rewrite ``ref`` to pull from ``mirror``: ``{mirror}/{path}[:tag][@digest]``.

    ``nginx:1.25`` with mirror ``127.0.0.1:31000`` gives
    ``127.0.0.1:31000/library/nginx:1.25``.  The result is checked to parse back to the
    repository ``{mirror}/{path}``; InvalidReferenceError is raised when it would not (for
    example when the mirror prefix pushes the path past 255 characters).
    """
    parse_mirror(mirror)
    rewritten = f"{mirror}/{ref.path}{_suffix(ref)}"
    parsed = parse_reference(rewritten)
    expected = f"{mirror}/{ref.path}"
    if parsed.name != expected:
        raise _invalid(
            "reference",
            rewritten,
            f"rewritten name normalises to {_quote(parsed.name)}, not {_quote(expected)}",
        )
    return rewritten
