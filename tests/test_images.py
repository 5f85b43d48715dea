"""Image reference parsing, normalisation and mirror rewriting (webhook.core.images).

The expectations follow github.com/distribution/reference (ParseNormalizedNamed) and
go-digest, which is what the kubelet and container runtimes apply to an ``image:`` field.
"""

from __future__ import annotations

import dataclasses
import re

import pytest

from mirrorgate.webhook.core.images import (
    ImageReference,
    InvalidReferenceError,
    parse_canonical,
    parse_domain,
    parse_mirror,
    parse_reference,
    with_mirror,
)

HEX64 = "1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a"
SHA256 = f"sha256:{'f' * 64}"
SHA384 = f"sha384:{'e' * 96}"
SHA512 = f"sha512:{'d' * 128}"


# --- parse_reference: accepted references ------------------------------------------------

# (input, domain, path, tag, digest, normalised, familiar)
ACCEPTED = [
    pytest.param(
        "nginx",
        "docker.io",
        "library/nginx",
        None,
        None,
        "docker.io/library/nginx",
        "nginx",
        id="a bare name is an official Docker Hub image without an implicit latest tag",
    ),
    pytest.param(
        "nginx:1.25",
        "docker.io",
        "library/nginx",
        "1.25",
        None,
        "docker.io/library/nginx:1.25",
        "nginx:1.25",
        id="a bare name with a tag keeps the tag",
    ),
    pytest.param(
        "docker.io/nginx",
        "docker.io",
        "library/nginx",
        None,
        None,
        "docker.io/library/nginx",
        "nginx",
        id="docker.io with one component gains the library namespace",
    ),
    pytest.param(
        "docker.io/library/nginx",
        "docker.io",
        "library/nginx",
        None,
        None,
        "docker.io/library/nginx",
        "nginx",
        id="a fully qualified official image stays as it is",
    ),
    pytest.param(
        "index.docker.io/foo",
        "docker.io",
        "library/foo",
        None,
        None,
        "docker.io/library/foo",
        "foo",
        id="index.docker.io becomes docker.io and one component gains library",
    ),
    pytest.param(
        "index.docker.io/user/app:v2",
        "docker.io",
        "user/app",
        "v2",
        None,
        "docker.io/user/app:v2",
        "user/app:v2",
        id="index.docker.io with a namespace becomes docker.io",
    ),
    pytest.param(
        "user/app",
        "docker.io",
        "user/app",
        None,
        None,
        "docker.io/user/app",
        "user/app",
        id="a lowercase first component without dot or colon is a Docker Hub namespace",
    ),
    pytest.param(
        "docker.io/library/foo/bar",
        "docker.io",
        "library/foo/bar",
        None,
        None,
        "docker.io/library/foo/bar",
        "library/foo/bar",
        id="a nested library path keeps library in its familiar form",
    ),
    pytest.param(
        "ghcr.io/org/app:v1",
        "ghcr.io",
        "org/app",
        "v1",
        None,
        "ghcr.io/org/app:v1",
        "ghcr.io/org/app:v1",
        id="a dotted first component is a registry",
    ),
    pytest.param(
        "ghcr.io/app",
        "ghcr.io",
        "app",
        None,
        None,
        "ghcr.io/app",
        "ghcr.io/app",
        id="other registries do not gain a library namespace",
    ),
    pytest.param(
        "localhost/app",
        "localhost",
        "app",
        None,
        None,
        "localhost/app",
        "localhost/app",
        id="localhost as first component is a registry",
    ),
    pytest.param(
        "localhost:5000/app:dev",
        "localhost:5000",
        "app",
        "dev",
        None,
        "localhost:5000/app:dev",
        "localhost:5000/app:dev",
        id="localhost with a port is a registry",
    ),
    pytest.param(
        "localhost",
        "docker.io",
        "library/localhost",
        None,
        None,
        "docker.io/library/localhost",
        "localhost",
        id="a lone localhost is an image name not a registry",
    ),
    pytest.param(
        "localhost:5000",
        "docker.io",
        "library/localhost",
        "5000",
        None,
        "docker.io/library/localhost:5000",
        "localhost:5000",
        id="a lone localhost with a port is the image localhost tagged 5000",
    ),
    pytest.param(
        "registry.local:5000",
        "docker.io",
        "library/registry.local",
        "5000",
        None,
        "docker.io/library/registry.local:5000",
        "registry.local:5000",
        id="a lone host and port is an image name with a numeric tag",
    ),
    pytest.param(
        "test:5000/repo",
        "test:5000",
        "repo",
        None,
        None,
        "test:5000/repo",
        "test:5000/repo",
        id="a port makes a single-label first component a registry",
    ),
    pytest.param(
        "127.0.0.1:5000/team/app",
        "127.0.0.1:5000",
        "team/app",
        None,
        None,
        "127.0.0.1:5000/team/app",
        "127.0.0.1:5000/team/app",
        id="an IPv4 registry with a port is kept",
    ),
    pytest.param(
        "192.168.1.1/repo",
        "192.168.1.1",
        "repo",
        None,
        None,
        "192.168.1.1/repo",
        "192.168.1.1/repo",
        id="an IPv4 registry without a port is kept",
    ),
    pytest.param(
        "registry.local:99999/app",
        "registry.local:99999",
        "app",
        None,
        None,
        "registry.local:99999/app",
        "registry.local:99999/app",
        id="reference ports are not range checked just as in distribution",
    ),
    pytest.param(
        "[::1]:5000/foo:tag",
        "[::1]:5000",
        "foo",
        "tag",
        None,
        "[::1]:5000/foo:tag",
        "[::1]:5000/foo:tag",
        id="a bracketed IPv6 loopback registry with a port is kept",
    ),
    pytest.param(
        "[2001:db8::1]/repo",
        "[2001:db8::1]",
        "repo",
        None,
        None,
        "[2001:db8::1]/repo",
        "[2001:db8::1]/repo",
        id="a bracketed IPv6 registry without a port is kept",
    ),
    pytest.param(
        "[2001:db8:1:2:3:4:5:6]/repo:tag",
        "[2001:db8:1:2:3:4:5:6]",
        "repo",
        "tag",
        None,
        "[2001:db8:1:2:3:4:5:6]/repo:tag",
        "[2001:db8:1:2:3:4:5:6]/repo:tag",
        id="an uncompressed IPv6 registry is kept",
    ),
    pytest.param(
        f"[2001:db8::]:5000/repo:tag@{SHA256}",
        "[2001:db8::]:5000",
        "repo",
        "tag",
        SHA256,
        f"[2001:db8::]:5000/repo:tag@{SHA256}",
        f"[2001:db8::]:5000/repo:tag@{SHA256}",
        id="an IPv6 registry works with a tag and a digest",
    ),
    pytest.param(
        "Foo.io/bar",
        "Foo.io",
        "bar",
        None,
        None,
        "Foo.io/bar",
        "Foo.io/bar",
        id="an uppercase registry domain is allowed and kept as written",
    ),
    pytest.param(
        "FOO/bar",
        "FOO",
        "bar",
        None,
        None,
        "FOO/bar",
        "FOO/bar",
        id="an uppercase first component is taken as a registry",
    ),
    pytest.param(
        "Uppercase/lowercase:tag",
        "Uppercase",
        "lowercase",
        "tag",
        None,
        "Uppercase/lowercase:tag",
        "Uppercase/lowercase:tag",
        id="a mixed case first component is a registry as in distribution",
    ),
    pytest.param(
        "nginx:Uppercase",
        "docker.io",
        "library/nginx",
        "Uppercase",
        None,
        "docker.io/library/nginx:Uppercase",
        "nginx:Uppercase",
        id="tags may contain uppercase letters",
    ),
    pytest.param(
        "nginx:_under.score-dash",
        "docker.io",
        "library/nginx",
        "_under.score-dash",
        None,
        "docker.io/library/nginx:_under.score-dash",
        "nginx:_under.score-dash",
        id="tags may start with an underscore and contain dots and dashes",
    ),
    pytest.param(
        "a__b",
        "docker.io",
        "library/a__b",
        None,
        None,
        "docker.io/library/a__b",
        "a__b",
        id="a double underscore is a separator",
    ),
    pytest.param(
        "a.b",
        "docker.io",
        "library/a.b",
        None,
        None,
        "docker.io/library/a.b",
        "a.b",
        id="a single dot is a separator in a lone name",
    ),
    pytest.param(
        "a-b",
        "docker.io",
        "library/a-b",
        None,
        None,
        "docker.io/library/a-b",
        "a-b",
        id="a single dash is a separator",
    ),
    pytest.param(
        "a---b",
        "docker.io",
        "library/a---b",
        None,
        None,
        "docker.io/library/a---b",
        "a---b",
        id="any run of dashes is a separator",
    ),
    pytest.param(
        "a_b/c",
        "docker.io",
        "a_b/c",
        None,
        None,
        "docker.io/a_b/c",
        "a_b/c",
        id="an underscore in a namespace keeps it on Docker Hub",
    ),
    pytest.param(
        "registry.io/foo/project--id.module--name.ver---sion--name",
        "registry.io",
        "foo/project--id.module--name.ver---sion--name",
        None,
        None,
        "registry.io/foo/project--id.module--name.ver---sion--name",
        "registry.io/foo/project--id.module--name.ver---sion--name",
        id="mixed separators inside one path component are allowed",
    ),
    pytest.param(
        "b.gcr.io/test.example.com/my-app:test.example.com",
        "b.gcr.io",
        "test.example.com/my-app",
        "test.example.com",
        None,
        "b.gcr.io/test.example.com/my-app:test.example.com",
        "b.gcr.io/test.example.com/my-app:test.example.com",
        id="only the first component can be a registry even if later ones look like hosts",
    ),
    pytest.param(
        "xn--n3h.com/myimage:xn--n3h.com",
        "xn--n3h.com",
        "myimage",
        "xn--n3h.com",
        None,
        "xn--n3h.com/myimage:xn--n3h.com",
        "xn--n3h.com/myimage:xn--n3h.com",
        id="punycode registry domains are allowed",
    ),
    pytest.param(
        f"nginx@{SHA256}",
        "docker.io",
        "library/nginx",
        None,
        SHA256,
        f"docker.io/library/nginx@{SHA256}",
        f"nginx@{SHA256}",
        id="a digest without a tag is kept",
    ),
    pytest.param(
        f"busybox:latest@{SHA256}",
        "docker.io",
        "library/busybox",
        "latest",
        SHA256,
        f"docker.io/library/busybox:latest@{SHA256}",
        f"busybox:latest@{SHA256}",
        id="a tag and a digest together are both kept",
    ),
    pytest.param(
        f"ghcr.io/x/y@{SHA256}",
        "ghcr.io",
        "x/y",
        None,
        SHA256,
        f"ghcr.io/x/y@{SHA256}",
        f"ghcr.io/x/y@{SHA256}",
        id="a digest on another registry keeps the registry in the familiar form",
    ),
    pytest.param(
        f"quay.io/a/b@{SHA384}",
        "quay.io",
        "a/b",
        None,
        SHA384,
        f"quay.io/a/b@{SHA384}",
        f"quay.io/a/b@{SHA384}",
        id="sha384 digests are accepted",
    ),
    pytest.param(
        f"xn--7o8h.com/myimage:xn--7o8h.com@{SHA512}",
        "xn--7o8h.com",
        "myimage",
        "xn--7o8h.com",
        SHA512,
        f"xn--7o8h.com/myimage:xn--7o8h.com@{SHA512}",
        f"xn--7o8h.com/myimage:xn--7o8h.com@{SHA512}",
        id="sha512 digests are accepted",
    ),
    pytest.param(
        f"docker.io/{HEX64}",
        "docker.io",
        f"library/{HEX64}",
        None,
        None,
        f"docker.io/library/{HEX64}",
        HEX64,
        id="a 64 hex name is allowed once a registry makes it unambiguous",
    ),
    pytest.param(
        f"{HEX64}:v1",
        "docker.io",
        f"library/{HEX64}",
        "v1",
        None,
        f"docker.io/library/{HEX64}:v1",
        f"{HEX64}:v1",
        id="a 64 hex name with a tag is not an image id",
    ),
    pytest.param(
        HEX64[:63],
        "docker.io",
        f"library/{HEX64[:63]}",
        None,
        None,
        f"docker.io/library/{HEX64[:63]}",
        HEX64[:63],
        id="a 63 hex name is an ordinary name",
    ),
    pytest.param(
        "thisisthesongthatneverendsitgoesonandonandonthisisthesongthatnev",
        "docker.io",
        "library/thisisthesongthatneverendsitgoesonandonandonthisisthesongthatnev",
        None,
        None,
        "docker.io/library/thisisthesongthatneverendsitgoesonandonandonthisisthesongthatnev",
        "thisisthesongthatneverendsitgoesonandonandonthisisthesongthatnev",
        id="a 64 character name that is not hex is an ordinary name",
    ),
]


@pytest.mark.parametrize(
    ("text", "domain", "path", "tag", "digest", "normalised", "familiar"), ACCEPTED
)
def test_parse_reference_normalises(text, domain, path, tag, digest, normalised, familiar):
    ref = parse_reference(text)
    assert (ref.domain, ref.path, ref.tag, ref.digest) == (domain, path, tag, digest)
    assert ref.name == f"{domain}/{path}"
    assert str(ref) == normalised
    assert ref.familiar == familiar


@pytest.mark.parametrize(
    ("text", "domain", "path", "tag", "digest", "normalised", "familiar"), ACCEPTED
)
def test_normalised_and_familiar_forms_parse_back_to_the_same_reference(
    text, domain, path, tag, digest, normalised, familiar
):
    ref = parse_reference(text)
    assert parse_reference(str(ref)) == ref
    if re.fullmatch("[a-f0-9]{64}", ref.familiar):
        # As in docker, the familiar form of a 64-hex repository reads as an image ID.
        with pytest.raises(InvalidReferenceError, match="64-byte hexadecimal"):
            parse_reference(ref.familiar)
    else:
        assert parse_reference(ref.familiar) == ref
    assert parse_canonical(str(ref)) == ref


# --- parse_reference: rejected references ------------------------------------------------

REJECTED = [
    pytest.param("", "reference is empty", id="an empty string is rejected"),
    pytest.param(" nginx", "whitespace", id="leading whitespace is rejected"),
    pytest.param("nginx ", "whitespace", id="trailing whitespace is rejected"),
    pytest.param("nginx\n", "whitespace", id="a trailing newline is rejected"),
    pytest.param("nginx :1.25", "whitespace", id="inner whitespace is rejected"),
    pytest.param(
        HEX64,
        "cannot specify 64-byte hexadecimal strings",
        id="a bare 64 hex string is an image id and is rejected",
    ),
    pytest.param("Foo", "repository name must be lowercase", id="an uppercase name is rejected"),
    pytest.param(
        "docker/Docker",
        "repository name must be lowercase",
        id="an uppercase repository under a namespace is rejected",
    ),
    pytest.param(
        "docker.io/Foo",
        "repository name must be lowercase",
        id="an uppercase repository on docker.io is rejected",
    ),
    pytest.param(
        "test:5000/Uppercase/lowercase:tag",
        "repository name must be lowercase",
        id="an uppercase path component after a registry is rejected",
    ),
    pytest.param(
        f"quay.io/Org/app@{SHA256}",
        "repository name must be lowercase",
        id="an uppercase path with a digest is rejected",
    ),
    pytest.param(
        "FOO_BAR/app",
        "repository name must be lowercase",
        id="an uppercase first component that is not a valid host reads as an uppercase path",
    ),
    pytest.param("nginx:", "tag is empty", id="a trailing colon is rejected"),
    pytest.param("nginx@", "digest is empty", id="a trailing at sign is rejected"),
    pytest.param(
        "nginx@sha256:short", "is not algorithm:hex", id="a digest that is not hex is rejected"
    ),
    pytest.param(
        f"nginx@sha256:{'f' * 31}",
        "is not algorithm:hex",
        id="a digest shorter than 32 hex digits fails the grammar",
    ),
    pytest.param(
        f"repo@sha256:{'f' * 34}",
        "invalid checksum digest length",
        id="a sha256 digest of the wrong length is rejected",
    ),
    pytest.param(
        f"repo@sha512:{'f' * 64}",
        "invalid checksum digest length",
        id="a sha512 digest with sha256 length is rejected",
    ),
    pytest.param(
        f"repo@sha256:{'F' * 64}",
        "lowercase hex",
        id="a sha256 digest in uppercase hex is rejected",
    ),
    pytest.param(
        f"repo@md5:{'a' * 32}",
        "unsupported digest algorithm",
        id="an unregistered digest algorithm is rejected",
    ),
    pytest.param(
        f"validname@invaliddigest:{'f' * 64}",
        "unsupported digest algorithm",
        id="an unknown algorithm name is rejected as unsupported",
    ),
    pytest.param(
        f"repo:v1@SHA256:{'f' * 64}",
        "invalid checksum digest format",
        id="an uppercase digest algorithm is rejected",
    ),
    pytest.param(f"nginx@{SHA256}@{SHA256}", "more than one '@'", id="two digests are rejected"),
    pytest.param("a//b", "empty component", id="a double slash is rejected"),
    pytest.param("docker.io//nginx", "empty component", id="a slash after the domain is rejected"),
    pytest.param("/nginx", "empty component", id="a leading slash is rejected"),
    pytest.param("nginx/", "empty component", id="a trailing slash is rejected"),
    pytest.param(":justtag", "empty component", id="a tag without a name is rejected"),
    pytest.param(f"@{SHA256}", "empty component", id="a digest without a name is rejected"),
    pytest.param(
        "a_-b", 'path component "a_-b"', id="an underscore followed by a dash is rejected"
    ),
    pytest.param("a..b", 'path component "a..b"', id="two dots in a row are rejected"),
    pytest.param("a___b", 'path component "a___b"', id="three underscores in a row are rejected"),
    pytest.param("-docker", 'path component "-docker"', id="a leading dash is rejected"),
    pytest.param("docker-/docker", 'path component "docker-"', id="a trailing dash is rejected"),
    pytest.param(
        "_docker/docker", 'path component "_docker"', id="a leading underscore is rejected"
    ),
    pytest.param("____/____", 'path component "____"', id="only underscores are rejected"),
    pytest.param(
        "aa/asdf$$^/aa", 'path component "asdf$$^"', id="punctuation in a path is rejected"
    ),
    pytest.param("nginx:1.25:extra", 'path component "nginx:1.25"', id="two tags are rejected"),
    pytest.param("nginx:-x", 'tag "-x"', id="a tag starting with a dash is rejected"),
    pytest.param("nginx:.x", 'tag ".x"', id="a tag starting with a dot is rejected"),
    pytest.param("nginx:a~b", 'tag "a~b"', id="a tag with a tilde is rejected"),
    pytest.param(
        "[::1",
        "bracketed registry host followed by",
        id="an unclosed IPv6 bracket alone is rejected",
    ),
    pytest.param("[::1/foo", 'registry host "[::1"', id="an unclosed IPv6 registry is rejected"),
    pytest.param(
        "[2001:db8::1]",
        "bracketed registry host followed by",
        id="an IPv6 address without a repository is rejected",
    ),
    pytest.param(
        "[2001:db8::1]:5000",
        "bracketed registry host followed by",
        id="an IPv6 address and port without a repository is rejected",
    ),
    pytest.param(
        "[fe80::1%eth0]:5000/repo",
        'registry host "[fe80::1%eth0]:5000"',
        id="an IPv6 zone id is rejected",
    ),
    pytest.param(
        "[2001:db8:3:4::192.0.2.33]:5000/debian",
        "registry host",
        id="an IPv6 address with embedded IPv4 is rejected",
    ),
    pytest.param(
        "fc00::1:5000/debian",
        'registry host "fc00::1:5000"',
        id="an IPv6 address without brackets is rejected",
    ),
    pytest.param("foo.com:http/bar", 'registry host "foo.com:http"', id="a named port is rejected"),
    pytest.param(
        "-docker.io/docker/docker",
        'registry host "-docker.io"',
        id="a registry starting with a dash is rejected",
    ),
    pytest.param(
        "https://github.com/docker/docker",
        'registry host "https:"',
        id="a URL with a scheme is rejected",
    ),
    pytest.param(
        "foo_bar.com/app",
        'registry host "foo_bar.com"',
        id="a dotted first component with an underscore is not a usable registry",
    ),
]


@pytest.mark.parametrize(("text", "reason"), REJECTED)
def test_parse_reference_rejects_with_a_reason(text, reason):
    with pytest.raises(InvalidReferenceError) as info:
        parse_reference(text)
    message = str(info.value)
    assert message.startswith("invalid reference ")
    assert reason in message
    assert "\n" not in message
    assert info.value.text == text
    assert reason in info.value.reason


def test_error_message_matches_the_documented_shape():
    with pytest.raises(InvalidReferenceError) as info:
        parse_reference("Foo")
    assert str(info.value) == 'invalid reference "Foo": repository name must be lowercase'
    assert isinstance(info.value, ValueError)


def test_error_message_for_a_huge_input_stays_short():
    with pytest.raises(InvalidReferenceError) as info:
        parse_reference("A" * 10_000)
    assert len(str(info.value)) < 400
    assert "(10000 characters)" in str(info.value)


# --- length limits -------------------------------------------------------------------------

LENGTHS = [
    pytest.param("example.com/" + "a" * 255, True, id="a 255 character path is accepted"),
    pytest.param("example.com/" + "a" * 256, False, id="a 256 character path is rejected"),
    pytest.param(
        "example.com/" + "a/" * 127 + "a",
        True,
        id="a 255 character path of many components is accepted",
    ),
    pytest.param(
        "example.com/" + "a/" * 127 + "ab",
        False,
        id="a 256 character path of many components is rejected",
    ),
    pytest.param(
        "a" * 247, True, id="a familiar name is 255 once library is added and is accepted"
    ),
    pytest.param(
        "a" * 248, False, id="a familiar name is 256 once library is added and is rejected"
    ),
    pytest.param(
        "a" * 300 + ".example.com/app",
        True,
        id="the registry host does not count towards the limit",
    ),
    pytest.param(
        "example.com/" + "a" * 255 + ":tag-puts-this-over-255",
        True,
        id="the tag does not count towards the limit",
    ),
]


@pytest.mark.parametrize(("text", "ok"), LENGTHS)
def test_repository_path_is_limited_to_255_characters(text, ok):
    if ok:
        ref = parse_reference(text)
        assert len(ref.path) <= 255
    else:
        with pytest.raises(InvalidReferenceError, match="must not be more than 255 characters"):
            parse_reference(text)


TAGS = [
    pytest.param("a" * 128, True, id="a 128 character tag is accepted"),
    pytest.param("a" * 129, False, id="a 129 character tag is rejected"),
    pytest.param("_" + "9" * 127, True, id="a 128 character tag starting with underscore is ok"),
]


@pytest.mark.parametrize(("tag", "ok"), TAGS)
def test_tags_are_limited_to_128_characters(tag, ok):
    if ok:
        assert parse_reference(f"nginx:{tag}").tag == tag
    else:
        with pytest.raises(InvalidReferenceError, match="more than 128"):
            parse_reference(f"nginx:{tag}")


# --- parse_canonical (ParseNamed) --------------------------------------------------------

NOT_CANONICAL = [
    pytest.param("nginx", "docker.io/library/nginx", id="a bare name is not canonical"),
    pytest.param(
        "docker.io/nginx", "docker.io/library/nginx", id="docker.io without library is not"
    ),
    pytest.param("library/foo", "docker.io/library/foo", id="library without docker.io is not"),
    pytest.param("test_com/foo", "docker.io/test_com/foo", id="a namespace without host is not"),
    pytest.param(
        "index.docker.io/user/app", "docker.io/user/app", id="the legacy hub domain is not"
    ),
]


@pytest.mark.parametrize(("text", "normalised"), NOT_CANONICAL)
def test_parse_canonical_names_the_normalised_form(text, normalised):
    with pytest.raises(InvalidReferenceError, match="must be canonical") as info:
        parse_canonical(text)
    assert f'"{normalised}"' in str(info.value)


def test_parse_canonical_accepts_normalised_references():
    ref = parse_canonical(f"test:8080/foo:v1@{SHA256}")
    assert (ref.domain, ref.path, ref.tag, ref.digest) == ("test:8080", "foo", "v1", SHA256)


# --- ImageReference ------------------------------------------------------------------------


def test_reference_is_a_frozen_value():
    ref = parse_reference("nginx:1.25")
    assert ref == ImageReference("docker.io", "library/nginx", "1.25", None)
    assert ref == parse_reference("docker.io/library/nginx:1.25")
    assert hash(ref) == hash(parse_reference("index.docker.io/library/nginx:1.25"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        ref.tag = "latest"  # type: ignore[misc]


def test_hand_built_reference_renders_like_a_parsed_one():
    ref = ImageReference(domain="ghcr.io", path="org/app", tag="v1", digest=SHA256)
    assert ref.name == "ghcr.io/org/app"
    assert str(ref) == f"ghcr.io/org/app:v1@{SHA256}"
    assert ref.familiar == str(ref)
    assert ImageReference(domain="docker.io", path="library/redis").familiar == "redis"


# --- with_mirror ----------------------------------------------------------------------------

REWRITES = [
    pytest.param(
        "nginx:1.25",
        "127.0.0.1:31000",
        "127.0.0.1:31000/library/nginx:1.25",
        id="an official image moves to a mirror by IP and port",
    ),
    pytest.param(
        "user/app",
        "localhost:5000",
        "localhost:5000/user/app",
        id="an untagged image stays untagged",
    ),
    pytest.param(
        "nginx",
        "localhost",
        "localhost/library/nginx",
        id="localhost without a port works as a mirror",
    ),
    pytest.param(
        "ghcr.io/org/app:v1",
        "registry.local:5000/ghcr",
        "registry.local:5000/ghcr/org/app:v1",
        id="a mirror prefix goes before the repository path",
    ),
    pytest.param(
        "quay.io/a/b:c",
        "m.example.org/mirror/quay",
        "m.example.org/mirror/quay/a/b:c",
        id="a multi component mirror prefix is kept",
    ),
    pytest.param(
        f"nginx@{SHA256}",
        "[::1]:5000",
        f"[::1]:5000/library/nginx@{SHA256}",
        id="a digest is kept on an IPv6 mirror",
    ),
    pytest.param(
        f"busybox:latest@{SHA256}",
        "mirror.io/hub",
        f"mirror.io/hub/library/busybox:latest@{SHA256}",
        id="a tag and a digest are both kept",
    ),
    pytest.param(
        "[2001:db8::1]/repo:tag",
        "[2001:db8::2]",
        "[2001:db8::2]/repo:tag",
        id="an IPv6 source moves to an IPv6 mirror without a port",
    ),
    pytest.param(
        "Foo.io/bar",
        "Mirror.Example.com",
        "Mirror.Example.com/bar",
        id="the mirror host is used exactly as written",
    ),
    pytest.param(
        "nginx",
        "docker.io/myorg",
        "docker.io/myorg/library/nginx",
        id="a docker.io mirror with a prefix round trips",
    ),
]


@pytest.mark.parametrize(("image", "mirror", "expected"), REWRITES)
def test_with_mirror_rewrites_and_round_trips(image, mirror, expected):
    ref = parse_reference(image)
    rewritten = with_mirror(ref, mirror)
    assert rewritten == expected
    back = parse_reference(rewritten)
    assert back.name.startswith(mirror + "/")
    assert back.name == f"{mirror}/{ref.path}"
    assert (back.tag, back.digest) == (ref.tag, ref.digest)
    assert str(back) == rewritten


def test_with_mirror_refuses_a_prefix_that_pushes_the_path_over_255():
    ref = parse_reference("example.com/" + "a" * 250)
    assert with_mirror(ref, "m.io/abcd") == "m.io/abcd/" + "a" * 250
    with pytest.raises(InvalidReferenceError, match="must not be more than 255 characters"):
        with_mirror(ref, "m.io/abcde")


def test_with_mirror_refuses_a_mirror_that_would_renormalise():
    ref = parse_reference("ghcr.io/app")
    with pytest.raises(InvalidReferenceError, match='normalises to "docker.io/library/app"'):
        with_mirror(ref, "docker.io")


def test_with_mirror_refuses_an_invalid_mirror():
    with pytest.raises(InvalidReferenceError, match="without a scheme"):
        with_mirror(parse_reference("nginx"), "https://mirror.io")


# --- parse_mirror ---------------------------------------------------------------------------

MIRRORS = [
    pytest.param("127.0.0.1:31000", ("127.0.0.1:31000", ""), id="an IP and port mirror"),
    pytest.param("registry.local", ("registry.local", ""), id="a dotted host mirror"),
    pytest.param(
        "registry.local/mirror/hub",
        ("registry.local", "mirror/hub"),
        id="a mirror with a multi component prefix",
    ),
    pytest.param("localhost", ("localhost", ""), id="localhost is a mirror host"),
    pytest.param(
        "localhost:5000/p", ("localhost:5000", "p"), id="localhost with a port and prefix"
    ),
    pytest.param("[::1]:5000", ("[::1]:5000", ""), id="an IPv6 loopback mirror with a port"),
    pytest.param(
        "[2001:db8::1]/cache", ("[2001:db8::1]", "cache"), id="an IPv6 mirror with a prefix"
    ),
    pytest.param("mirror:5000", ("mirror:5000", ""), id="a single label host with a port"),
    pytest.param(
        "Mirror.Example.com", ("Mirror.Example.com", ""), id="the host case is kept as written"
    ),
    pytest.param(
        "m.io/a__b/c---d/e.f", ("m.io", "a__b/c---d/e.f"), id="prefix components use separators"
    ),
]


@pytest.mark.parametrize(("text", "expected"), MIRRORS)
def test_parse_mirror_accepts(text, expected):
    assert parse_mirror(text) == expected


BAD_MIRRORS = [
    pytest.param(
        "https://x", "must be host[:port][/path-prefix] without a scheme", id="a scheme is rejected"
    ),
    pytest.param("http://registry:5000", "without a scheme", id="a plain http scheme is rejected"),
    pytest.param("", "mirror is empty", id="an empty mirror is rejected"),
    pytest.param(" registry.local", "whitespace", id="leading whitespace is rejected"),
    pytest.param("registry.local/", "must not end with '/'", id="a trailing slash is rejected"),
    pytest.param("registry.local//x", "empty component", id="a double slash is rejected"),
    pytest.param("/prefix", "registry host is empty", id="a missing host is rejected"),
    pytest.param(
        "registry.local/Prefix", "must be lowercase", id="an uppercase prefix is rejected"
    ),
    pytest.param(
        "registry.local/pre_-fix", 'prefix component "pre_-fix"', id="a bad separator is rejected"
    ),
    pytest.param("registry.local/app:v1", "without a tag", id="a tag is rejected"),
    pytest.param(f"registry.local/app@{SHA256}", "without a digest", id="a digest is rejected"),
    pytest.param(
        "registry", "Docker Hub namespace", id="a single label host without port is rejected"
    ),
    pytest.param(
        "registry/prefix",
        "Docker Hub namespace",
        id="a single label host with a prefix is rejected",
    ),
    pytest.param(
        "index.docker.io", "normalised to docker.io", id="the legacy hub domain is rejected"
    ),
    pytest.param("[::1", "closing ']'", id="an unclosed IPv6 bracket is rejected"),
    pytest.param("[fe80::1%eth0]:5000", "zone identifiers", id="an IPv6 zone id is rejected"),
    pytest.param("fe80::1", "must be written in brackets", id="bare IPv6 is rejected"),
    pytest.param(
        "[1:2:3:4:5:6:7:8:9]",
        "not a valid IPv6 address",
        id="an IPv6 address with nine groups is rejected",
    ),
    pytest.param("[::g]", "not a valid host[:port]", id="non hex IPv6 is rejected"),
    pytest.param("registry.local:0", "outside 1-65535", id="port zero is rejected"),
    pytest.param("registry.local:65536", "outside 1-65535", id="port 65536 is rejected"),
    pytest.param("registry.local:http", "not a valid host[:port]", id="a named port is rejected"),
    pytest.param("-bad.com", "not a valid host[:port]", id="a host starting with dash is rejected"),
    pytest.param("bad_host.com", "not a valid host[:port]", id="an underscore host is rejected"),
]


@pytest.mark.parametrize(("text", "reason"), BAD_MIRRORS)
def test_parse_mirror_rejects_with_a_reason(text, reason):
    with pytest.raises(InvalidReferenceError) as info:
        parse_mirror(text)
    assert str(info.value).startswith("invalid mirror ")
    assert reason in str(info.value)


# --- parse_domain ---------------------------------------------------------------------------

DOMAINS = [
    pytest.param("ghcr.io", "ghcr.io", id="a plain domain is kept"),
    pytest.param("GHCR.IO", "ghcr.io", id="a domain is lower cased"),
    pytest.param("docker.io", "docker.io", id="docker.io is kept"),
    pytest.param("index.docker.io", "docker.io", id="index.docker.io becomes docker.io"),
    pytest.param(
        "Index.Docker.IO", "docker.io", id="index.docker.io in any case becomes docker.io"
    ),
    pytest.param(
        "registry-1.docker.io", "registry-1.docker.io", id="registry-1.docker.io is not rewritten"
    ),
    pytest.param("localhost", "localhost", id="localhost is a domain"),
    pytest.param("localhost:5000", "localhost:5000", id="localhost with a port is a domain"),
    pytest.param("127.0.0.1:5000", "127.0.0.1:5000", id="an IPv4 address with a port"),
    pytest.param("[::1]:5000", "[::1]:5000", id="an IPv6 address with a port"),
    pytest.param("[2001:DB8::1]", "[2001:db8::1]", id="an IPv6 address is lower cased"),
    pytest.param("registry:5000", "registry:5000", id="a single label with a port is a domain"),
]


@pytest.mark.parametrize(("text", "expected"), DOMAINS)
def test_parse_domain_normalises(text, expected):
    assert parse_domain(text) == expected


def test_parse_domain_output_matches_parsed_reference_domains():
    for image in ("ghcr.io/a/b", "index.docker.io/x", "[::1]:5000/x", "localhost/x"):
        ref = parse_reference(image)
        assert parse_domain(ref.domain) == ref.domain


BAD_DOMAINS = [
    pytest.param("", "registry domain is empty", id="an empty domain is rejected"),
    pytest.param(" ghcr.io", "whitespace", id="leading whitespace is rejected"),
    pytest.param("ghcr.io ", "whitespace", id="trailing whitespace is rejected"),
    pytest.param("gh cr.io", "whitespace", id="inner whitespace is rejected"),
    pytest.param(
        "https://ghcr.io", "must be host[:port] without a scheme", id="a scheme is rejected"
    ),
    pytest.param("ghcr.io/org", "without a path", id="a path is rejected"),
    pytest.param("ghcr.io/", "without a path", id="a trailing slash is rejected"),
    pytest.param("user@ghcr.io", "without a digest", id="an at sign is rejected"),
    pytest.param("ghcr", "Docker Hub namespace", id="a single label is rejected"),
    pytest.param("ghcr.io:99999", "outside 1-65535", id="an out of range port is rejected"),
    pytest.param("ghcr.io:abc", "not a valid host[:port]", id="a named port is rejected"),
    pytest.param("[::1", "closing ']'", id="an unclosed IPv6 bracket is rejected"),
    pytest.param("[fe80::1%25eth0]", "zone identifiers", id="an IPv6 zone id is rejected"),
    pytest.param("ghcr..io", "not a valid host[:port]", id="an empty label is rejected"),
]


@pytest.mark.parametrize(("text", "reason"), BAD_DOMAINS)
def test_parse_domain_rejects_with_a_reason(text, reason):
    with pytest.raises(InvalidReferenceError) as info:
        parse_domain(text)
    assert str(info.value).startswith("invalid registry domain ")
    assert reason in str(info.value)
