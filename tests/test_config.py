"""mirrorgate.yaml loading: every problem reported at once, with its key path."""

from __future__ import annotations

import textwrap

import pytest

from mirrorgate.webhook.core.config import ConfigError, load_config, parse_config
from mirrorgate.webhook.core.images import parse_reference

EXAMPLE = textwrap.dedent(
    """\
    mirrors:
      - upstream: docker.io
        mirror: 127.0.0.1:31000
      - upstream: ghcr.io
        mirror: registry.example.org/ghcr
    skip: ["registry.example.org/*"]
    pullSecret: {name: mirrorgate-pull}
    namespaces:
      mode: optIn
      exclude: [kube-system]
    """
)


def test_the_documented_example_loads():
    cfg = parse_config(EXAMPLE)
    assert [(m.upstream, m.mirror) for m in cfg.mirrors] == [
        ("docker.io", "127.0.0.1:31000"),
        ("ghcr.io", "registry.example.org/ghcr"),
    ]
    assert cfg.skip == ("registry.example.org/*",)
    assert cfg.pull_secret is not None and cfg.pull_secret.name == "mirrorgate-pull"
    assert cfg.namespaces.mode == "optIn"
    assert cfg.namespaces.exclude == ("kube-system",)


def test_an_empty_file_is_a_valid_config_that_rewrites_nothing():
    cfg = parse_config("")
    assert cfg.mirrors == () and cfg.pull_secret is None
    assert cfg.namespaces.mode == "optIn"


def test_kube_system_is_excluded_even_when_the_config_omits_it():
    cfg = parse_config("namespaces: {mode: clusterWide, exclude: [team-infra]}")
    assert cfg.namespaces.exclude == ("kube-system", "team-infra")
    assert cfg.namespaces.excluded("kube-system", own_namespace="mirrorgate")
    assert cfg.namespaces.excluded("mirrorgate", own_namespace="mirrorgate")
    assert not cfg.namespaces.excluded("default", own_namespace="mirrorgate")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("mirrorz: []", "mirrorz: unknown key", id="an unknown top-level key is named"),
        pytest.param(
            "mirrors: [{upstream: docker.io, mirror: 'https://reg.example.org'}]",
            "mirrors[0].mirror: 'https://reg.example.org'",
            id="a mirror with a scheme is rejected",
        ),
        pytest.param(
            "mirrors: [{upstream: docker.io, mirror: reg.example.org},"
            " {upstream: ghcr.io, mirror: 'Bad Host'}]",
            "mirrors[1].mirror:",
            id="the index of the bad mirror is named",
        ),
        pytest.param(
            "mirrors: [{upstream: 'http://docker.io', mirror: x.io}]",
            "mirrors[0].upstream:",
            id="an upstream with a scheme is rejected",
        ),
        pytest.param(
            "mirrors: [{upstream: docker.io}]",
            "mirrors[0].mirror: required",
            id="a mirror entry without a mirror is named",
        ),
        pytest.param(
            "mirrors: [{upstream: docker.io, mirror: a.io, extra: 1}]",
            "mirrors[0].extra: unknown key",
            id="an unknown key inside a mirror entry is named",
        ),
        pytest.param(
            "mirrors: [{upstream: docker.io, mirror: a.io}, {upstream: docker.io, mirror: a.io}]",
            "mirrors[1].mirror: 'a.io' is already listed for 'docker.io' by mirrors[0].mirror",
            id="the same upstream and mirror twice is rejected",
        ),
        pytest.param(
            "mirrors: [{upstream: docker.io, mirror: [a.io, a.io]}]",
            "mirrors[0].mirror[1]: 'a.io' is already listed for 'docker.io' by "
            "mirrors[0].mirror[0]",
            id="a mirror listed twice in one entry is rejected",
        ),
        pytest.param(
            "mirrors: [{upstream: docker.io, mirror: []}]",
            "mirrors[0].mirror: an empty list",
            id="an empty mirror list is rejected",
        ),
        pytest.param(
            "mirrors: [{upstream: docker.io, mirror: a.io, platforms: [linux/amd65]}]",
            "mirrors[0].platforms[0]: 'linux/amd65' is not a platform",
            id="an unknown platform architecture is named",
        ),
        pytest.param(
            "mirrors: [{upstream: docker.io, mirror: a.io, platforms: linux/amd64}]",
            "mirrors[0].platforms: must be a list",
            id="platforms as a string is rejected",
        ),
        pytest.param(
            "skip: ['reg.io/[abc']", "skip[0]:", id="an unclosed bracket in a glob is rejected"
        ),
        pytest.param("skip: 'reg.io/*'", "skip: must be a list", id="skip as a string is rejected"),
        pytest.param(
            "pullSecret: {name: Bad_Name}",
            "pullSecret.name: 'Bad_Name' is not a valid Secret name",
            id="an invalid secret name is rejected",
        ),
        pytest.param(
            "namespaces: {mode: everywhere}",
            "namespaces.mode: 'everywhere' is not one of optIn, clusterWide",
            id="an unknown namespace mode lists the allowed values",
        ),
        pytest.param(
            "namespaces: {exclude: [Kube_System]}",
            "namespaces.exclude[0]:",
            id="an invalid namespace name in exclude is rejected",
        ),
        pytest.param("mirrors: [a: b", "not valid YAML at line", id="broken YAML says where"),
        pytest.param("- a\n- b", "must be a mapping", id="a top-level list is rejected"),
    ],
)
def test_bad_configs_name_the_key_path(text, expected):
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert expected in str(info.value)


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as info:
        parse_config(
            "mirrors: [{upstream: docker.io, mirror: 'a b'}]\n"
            "skip: ['[x']\n"
            "namespaces: {mode: nope}\n"
            "bogus: 1\n"
        )
    assert len(info.value.problems) == 4
    joined = "\n".join(info.value.problems)
    for path in ("mirrors[0].mirror", "skip[0]", "namespaces.mode", "bogus"):
        assert path in joined


def test_a_missing_file_is_reported_with_its_path(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(info.value) and "cannot read" in str(info.value)


@pytest.mark.parametrize(
    ("image", "expected_upstream"),
    [
        pytest.param("nginx", "docker.io", id="a docker hub short name matches docker.io"),
        pytest.param(
            "ghcr.io/org/team/app:1", "ghcr.io/org/team", id="the longest upstream prefix wins"
        ),
        pytest.param("ghcr.io/org/other", "ghcr.io", id="a domain upstream covers other paths"),
        pytest.param(
            "ghcr.io/organisation/x", "ghcr.io", id="a prefix matches whole path components only"
        ),
        pytest.param("quay.io/x/y", "*", id="the catch-all takes what nothing else matches"),
    ],
)
def test_mirror_selection(image, expected_upstream):
    cfg = parse_config(
        "mirrors:\n"
        "  - {upstream: '*', mirror: m.example.org/all}\n"
        "  - {upstream: docker.io, mirror: m.example.org/hub}\n"
        "  - {upstream: ghcr.io, mirror: m.example.org/ghcr}\n"
        "  - {upstream: ghcr.io/org/team, mirror: m.example.org/team}\n"
    )
    mirror = cfg.mirror_for(parse_reference(image))
    assert mirror is not None and mirror.upstream == expected_upstream


def test_several_mirrors_for_one_upstream_keep_their_priority_order():
    cfg = parse_config(
        "mirrors:\n"
        "  - {upstream: docker.io, mirror: [eu.mirror.example/hub, us.mirror.example/hub]}\n"
        "  - {upstream: ghcr.io, mirror: eu.mirror.example/ghcr}\n"
        "  - upstream: docker.io\n"
        "    mirror: backup.example/hub\n"
        "    type: copy\n"
        "    platforms: [linux/amd64, linux/arm64/v8]\n"
    )
    found = cfg.mirrors_for(parse_reference("nginx:1.27"))
    assert [m.mirror for m in found] == [
        "eu.mirror.example/hub",
        "us.mirror.example/hub",
        "backup.example/hub",
    ]
    assert found[2].type == "copy" and found[2].platforms == ("linux/amd64", "linux/arm64/v8")
    assert found[0].platforms == ()
    # The first one is the one a single-mirror caller gets.
    assert cfg.mirror_for(parse_reference("nginx")) is found[0]
    # An image already on any of them is recognised as mirrored.
    served = cfg.mirror_serving(parse_reference("us.mirror.example/hub/library/nginx:1.27"))
    assert served is not None and served.mirror == "us.mirror.example/hub"


def test_registry_access_and_mirror_awareness_settings_load():
    cfg = parse_config(
        textwrap.dedent(
            """\
            mirrors:
              - {upstream: docker.io, mirror: "127.0.0.1:31000", type: copy}
              - {upstream: ghcr.io, mirror: reg.example.org/ghcr, verify: false}
            registries:
              127.0.0.1:31000: {caFile: /etc/mirrorgate/ca.crt,
                                auth: {usernameFile: /u, passwordFile: /p}}
              reg.example.org: {dockerConfigFile: /etc/mirrorgate/pull/.dockerconfigjson}
              localhost:5000: {plainHTTP: true}
            verifyTimeout: 1500ms
            pinDigests: true
            registryClient: {timeout: 3s, positiveTTL: 5m, negativeTTL: 2s, maxConcurrency: 8}
            """
        )
    )
    assert [(m.type, m.verify) for m in cfg.mirrors] == [("copy", True), ("proxy", False)]
    assert cfg.registries["127.0.0.1:31000"].username_file == "/u"
    assert cfg.registries["reg.example.org"].docker_config_file.endswith(".dockerconfigjson")
    assert cfg.registries["localhost:5000"].plain_http is True
    assert cfg.verify_timeout == 1.5 and cfg.pin_digests is True
    rc = cfg.registry_client
    assert (rc.timeout, rc.positive_ttl, rc.negative_ttl, rc.max_concurrency) == (3, 300, 2, 8)
    assert cfg.needs_registry


def test_defaults_verify_mirrors_within_two_seconds():
    cfg = parse_config("mirrors: [{upstream: docker.io, mirror: m.example.org}]")
    assert cfg.mirrors[0].verify is True and cfg.mirrors[0].type == "proxy"
    assert cfg.verify_timeout == 2.0 and cfg.pin_digests is False


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "verifyTimeout: soon",
            "verifyTimeout: 'soon' is not a positive duration",
            id="a duration without a number is rejected",
        ),
        pytest.param(
            "verifyTimeout: 40s",
            "longer than 25s",
            id="a verify timeout beyond the API server's limit is rejected",
        ),
        pytest.param(
            "pinDigests: yes please",
            "pinDigests: must be true or false",
            id="a non-boolean pinDigests is rejected",
        ),
        pytest.param(
            "mirrors: [{upstream: docker.io, mirror: m.io, type: mirror}]",
            "mirrors[0].type: 'mirror' is not one of proxy, hosted, copy",
            id="an unknown mirror type lists the allowed ones",
        ),
        pytest.param(
            "registries: {'https://r.io': {}}",
            "registries.https://r.io:",
            id="a registry key with a scheme is rejected",
        ),
        pytest.param(
            "registries: {r.io: {auth: {usernameFile: /u}}}",
            "registries.r.io.auth.passwordFile: required",
            id="auth without a password file is rejected",
        ),
        pytest.param(
            "registries: {r.io: {plainHTTP: true, caFile: /ca}}",
            "registries.r.io.caFile: has no effect with plainHTTP",
            id="a CA for a plain HTTP registry is rejected",
        ),
        pytest.param(
            "registries: {r.io: {token: x}}",
            "registries.r.io.token: unknown key",
            id="an unknown registry setting is named",
        ),
        pytest.param(
            "registryClient: {maxConcurrency: 0}",
            "registryClient.maxConcurrency: must be a positive integer",
            id="a zero concurrency is rejected",
        ),
    ],
)
def test_bad_registry_settings_name_the_key_path(text, expected):
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert expected in str(info.value)


SCAN = """\
scan:
  clair: {url: "http://clair:6060/", pskFile: /etc/mirrorgate/clair-psk, issuer: mirrorgate}
  blockSeverity: High
  fixableOnly: false
  allow:
    - {id: CVE-2024-1234, images: ["*/library/nginx*"], until: 2027-03-31, reason: "not reachable"}
  onPending: deny
  onUnavailable: warn
  admissionBudget: 3s
  platforms: [linux/amd64]
  mode: enforce
  events: {tokenFile: /etc/mirrorgate/events-token}
"""


def test_the_documented_scan_policy_loads():
    import datetime as dt

    scan = parse_config(SCAN).scan
    assert scan is not None
    assert scan.clair.url == "http://clair:6060" and scan.clair.issuer == "mirrorgate"
    assert scan.block_severity == "High" and scan.platforms == ("linux/amd64",)
    (entry,) = scan.allow
    assert entry.id == "CVE-2024-1234" and entry.until == dt.date(2027, 3, 31)
    assert entry.images == ("*/library/nginx*",)
    assert (scan.on_pending, scan.on_unavailable, scan.admission_budget) == ("deny", "warn", 3.0)
    assert scan.events.token_file == "/etc/mirrorgate/events-token"


@pytest.mark.parametrize(
    ("replace", "by", "expected"),
    [
        pytest.param(
            "blockSeverity: High",
            "blockSeverity: Severe",
            "scan.blockSeverity: 'Severe' is not one of Unknown, Negligible, Low, Medium, "
            "High, Critical",
            id="an unknown severity lists the scale",
        ),
        pytest.param(
            "onPending: deny",
            "onPending: retry",
            "scan.onPending: 'retry'",
            id="an unknown onPending action is rejected",
        ),
        pytest.param(
            "until: 2027-03-31",
            "until: next year",
            "scan.allow[0].until:",
            id="an allow entry without a date is rejected",
        ),
        pytest.param(
            ', reason: "not reachable"',
            "",
            "scan.allow[0].reason: required",
            id="an allow entry must say why",
        ),
        pytest.param(
            "platforms: [linux/amd64]",
            "platforms: [amd64]",
            "scan.platforms[0]:",
            id="a platform must be os/arch",
        ),
        pytest.param(
            "mode: enforce", "mode: strict", "scan.mode: 'strict'", id="an unknown mode is rejected"
        ),
        pytest.param(
            'url: "http://clair:6060/"',
            "url: clair:6060",
            "scan.clair.url:",
            id="a Clair URL needs a scheme",
        ),
        pytest.param(
            "admissionBudget: 3s",
            "admissionBudget: 45s",
            "longer than 25s",
            id="a budget beyond the API server's timeout is rejected",
        ),
    ],
)
def test_bad_scan_policies_name_the_key(replace, by, expected):
    assert replace in SCAN
    with pytest.raises(ConfigError) as info:
        parse_config(SCAN.replace(replace, by))
    assert expected in str(info.value)


def test_pull_secret_source_and_service_account_patching():
    cfg = parse_config(
        "pullSecret: {name: mirrorgate-pull, source: docker-registry/mirrorgate-pull,"
        " patchServiceAccounts: true}"
    )
    ps = cfg.pull_secret
    assert (ps.source_namespace, ps.source_name, ps.patch_service_accounts) == (
        "docker-registry",
        "mirrorgate-pull",
        True,
    )
    with pytest.raises(ConfigError, match="pullSecret.source: 'nosource'"):
        parse_config("pullSecret: {name: p, source: nosource}")
    with pytest.raises(ConfigError, match="patchServiceAccounts: needs pullSecret.source"):
        parse_config("pullSecret: {name: p, patchServiceAccounts: true}")
