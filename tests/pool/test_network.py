"""pool/network.py: the network policy for client-chosen URLs, against real local servers.

The targets are aiohttp servers on loopback addresses, which the default policy refuses; an
allowlist opens them, and a redirect from an allowed host to a refused one stays refused.
"""
# ruff: noqa: ASYNC240 -- tests read back small files in tmp_path; blocking is harmless here

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pool_helpers import make_config, wait_until

from pool.config import FilesConfig, NetworkConfig, WebhooksConfig
from pool.errors import ConfigError
from pool.files import FileFetchError, prepare_inputs
from pool.metrics import Metrics
from pool.network import (
    NetworkPolicy,
    NetworkRefused,
    UrlChecker,
    UrlUnresolvable,
    client_session,
    redact_text,
    redact_url,
)
from pool.prediction import Prediction, PredictionRequest
from pool.webhooks import WebhookSender

SCHEMA: dict[str, Any] = {
    "components": {"schemas": {"Input": {"properties": {"image": {"format": "uri"}}}}}
}


class Target:
    """A local server that counts every request it gets, and can redirect elsewhere."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.hits: list[str] = []
        self.redirect_to: str | None = None
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.server = TestServer(app, host=host)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits.append(f"{request.method} {request.path}")
        if self.redirect_to is not None and request.path == "/redirect":
            raise web.HTTPFound(self.redirect_to)
        return web.Response(body=b"secret bytes")

    def url(self, path: str, host: str | None = None) -> str:
        return f"http://{host or self.host}:{self.server.port}{path}"


@pytest.fixture
async def target() -> AsyncIterator[Target]:
    t = Target("127.0.0.1")
    await t.server.start_server()
    yield t
    await t.server.close()


@pytest.fixture
async def other() -> AsyncIterator[Target]:
    t = Target("127.0.0.2")  # all of 127/8 is loopback on Linux
    await t.server.start_server()
    yield t
    await t.server.close()


async def fetch(url: str, tmp_path: Path, network: NetworkConfig) -> str:
    out = await prepare_inputs(
        SCHEMA, {"image": url}, str(tmp_path / "in"), FilesConfig(), network=network
    )
    return str(out["image"])


# --- the policy ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("address", "category"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "private"),
        ("fc00::1", "private"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("169.254.169.254", "metadata"),
        ("fd00:ec2::254", "metadata"),
    ],
)
def test_default_policy_refuses_internal_addresses(address: str, category: str) -> None:
    policy = NetworkPolicy(NetworkConfig())
    reason = policy.address_refusal(address)
    assert reason is not None and category in reason
    assert policy.address_refusal("93.184.216.34") is None
    assert policy.address_refusal("2606:4700::1111") is None


def test_allow_private_never_opens_metadata_but_allow_cidrs_can() -> None:
    private = NetworkPolicy(NetworkConfig(allow_private=True))
    assert private.address_refusal("127.0.0.1") is None
    assert private.address_refusal("10.0.0.1") is None
    assert "metadata" in (private.address_refusal("169.254.169.254") or "")
    explicit = NetworkPolicy(NetworkConfig(allow_cidrs=("169.254.169.254/32",)))
    assert explicit.address_refusal("169.254.169.254") is None
    assert explicit.address_refusal("169.254.169.253") is not None


def test_literal_urls_and_schemes_are_checked_before_any_connection() -> None:
    policy = NetworkPolicy(NetworkConfig())
    assert "loopback" in (policy.url_refusal("http://[::1]:80/x") or "")
    assert "scheme" in (policy.url_refusal("file:///etc/passwd") or "")
    assert policy.url_refusal("https://example.com/x") is None  # names: checked once resolved
    listed = NetworkPolicy(NetworkConfig(allow_hosts=("127.0.0.1", "*.corp.example")))
    assert listed.url_refusal("http://127.0.0.1:9/x") is None
    assert listed.host_allowed("files.corp.example") and not listed.host_allowed("corp.example")
    with pytest.raises(NetworkRefused, match=r"169\.254\.169\.254 is a cloud metadata address"):
        policy.check_url("http://169.254.169.254/latest/meta-data/?token=x")


def test_bad_cidr_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"network\.allow_cidrs.*not-a-range"):
        make_config(tmp_path, **{"network.allow_cidrs": ["not-a-range"]})
    config = make_config(tmp_path, **{"network.allow_cidrs": "10.0.0.0/8,fd00::/8"})
    assert config.network.allow_cidrs == ("10.0.0.0/8", "fd00::/8")
    assert all(ipaddress.ip_network(c) for c in config.network.allow_cidrs)


# --- input URLs ---------------------------------------------------------------------------------
async def test_input_url_to_loopback_is_refused_by_default(target: Target, tmp_path: Path) -> None:
    url = target.url("/cat.png?sig=TOPSECRET")
    with pytest.raises(FileFetchError) as err:
        await fetch(url, tmp_path, NetworkConfig())
    message = str(err.value)
    assert err.value.field == "image"
    assert "'image'" in message and target.url("/cat.png") in message
    assert "127.0.0.1 is a loopback address" in message and "network.allow_cidrs" in message
    assert "TOPSECRET" not in message
    assert target.hits == []  # nothing was sent


async def test_a_name_is_checked_on_the_address_it_resolves_to(
    target: Target, tmp_path: Path
) -> None:
    url = target.url("/cat.png", host="localhost")
    with pytest.raises(FileFetchError, match="localhost resolves only to refused addresses"):
        await fetch(url, tmp_path, NetworkConfig())
    assert target.hits == []
    # The allowlist by name opens it.
    path = await fetch(url, tmp_path, NetworkConfig(allow_hosts=("localhost",)))
    assert Path(path).read_bytes() == b"secret bytes"


async def test_allowlisted_range_is_fetched(target: Target, tmp_path: Path) -> None:
    path = await fetch(target.url("/cat.png"), tmp_path, NetworkConfig(allow_cidrs=("127.0.0.1",)))
    assert Path(path).read_bytes() == b"secret bytes"
    assert target.hits == ["GET /cat.png"]


async def test_redirect_from_an_allowed_host_to_a_refused_one_is_refused(
    target: Target, other: Target, tmp_path: Path
) -> None:
    # Steps: 127.0.0.2 is allowed; it redirects to 127.0.0.1 (a literal address), then to
    # localhost (a name that resolves to a refused address).
    allowed = NetworkConfig(allow_cidrs=("127.0.0.2/32",))
    for location in (target.url("/secret"), target.url("/secret", host="localhost")):
        other.redirect_to = location
        with pytest.raises(FileFetchError, match="refused by the network policy"):
            await fetch(other.url("/redirect"), tmp_path, allowed)
    # Result: the allowed host saw both requests, the refused one none.
    assert other.hits == ["GET /redirect", "GET /redirect"]
    assert target.hits == []


async def test_guarded_session_refuses_in_the_connector(target: Target) -> None:
    # The session itself is the guard: any request through it is checked.
    async with client_session(NetworkConfig()) as session:
        with pytest.raises(NetworkRefused):
            await session.get(target.url("/x"))
    assert target.hits == []


# --- webhooks -----------------------------------------------------------------------------------
async def test_webhook_to_loopback_is_logged_not_sent_and_never_retried(
    target: Target, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    sender = WebhookSender(WebhooksConfig(retry_initial_s=0.01), metrics=metrics)
    url = target.url("/hook?token=TOPSECRET")
    body = {"id": "p1", "input": {}, "webhook": url}
    prediction = Prediction(PredictionRequest.from_body(body))
    caplog.set_level(logging.INFO, logger="pool.webhooks")
    sender.watch(prediction)
    prediction.mark_started(runner_index=0)
    prediction.fail("done")
    await sender.close(5.0)
    refused = [r.getMessage() for r in caplog.records if "webhook_refused" in r.getMessage()]
    assert len(refused) == 1, caplog.text
    assert target.url("/hook") in refused[0] and "loopback" in refused[0]
    assert "TOPSECRET" not in caplog.text
    assert target.hits == []
    assert "cog_pool_webhook_failures_total 1.0\n" in metrics.render()


async def test_webhook_to_an_allowlisted_receiver_is_sent(target: Target) -> None:
    sender = WebhookSender(WebhooksConfig(), network=NetworkConfig(allow_cidrs=("127.0.0.0/8",)))
    body = {
        "id": "p2",
        "input": {},
        "webhook": target.url("/hook"),
        "webhook_events_filter": ["completed"],
    }
    prediction = Prediction(PredictionRequest.from_body(body))
    sender.watch(prediction)
    prediction.fail("done")
    await wait_until(lambda: target.hits, what="webhook received")
    await sender.close(5.0)
    assert target.hits == ["POST /hook"]


# --- redaction ----------------------------------------------------------------------------------
def test_redaction_removes_credentials_and_queries() -> None:
    assert (
        redact_url("https://user:pw@h.example:8443/p/a?token=x#f") == "https://h.example:8443/p/a"
    )
    assert redact_url("http://[::1]:80/x?y") == "http://[::1]:80/x"
    assert redact_url("data:text/plain;base64," + "A" * 100).endswith("...")
    text = "Cannot connect to https://a:b@h.example/p?sig=S3CRET (error)"
    assert redact_text(text) == "Cannot connect to https://h.example/p (error)"


# --- checking a URL before it is accepted (webhooks at submission) -----------------------------
async def test_the_checker_refuses_literal_and_resolved_internal_addresses(target: Target) -> None:
    checker = UrlChecker(NetworkConfig(), timeout_s=5.0)
    try:
        with pytest.raises(NetworkRefused, match=r"127\.0\.0\.1 is a loopback address") as e:
            await checker.check(target.url("/hook?token=TOPSECRET"))
        assert target.url("/hook") in str(e.value) and "TOPSECRET" not in str(e.value)
        # A name is judged by what it resolves to, off the loop.
        with pytest.raises(NetworkRefused, match="localhost resolves only to refused addresses"):
            await checker.check(target.url("/hook", host="localhost"))
        with pytest.raises(NetworkRefused, match="a cloud metadata address"):
            await checker.check("http://169.254.169.254/latest/meta-data/")
        unresolvable = r"its host no-such-host\.invalid did not resolve"
        with pytest.raises(UrlUnresolvable, match=unresolvable):
            await checker.check("http://no-such-host.invalid/hook")
        # A name the IDNA codec refuses (a label over 63 characters; found by schemathesis).
        with pytest.raises(UrlUnresolvable, match=r"is not a valid host name \(.*too long"):
            await checker.check(f"https://{'a' * 70}.dev/hook")
    finally:
        checker.close()
    assert target.hits == []  # checking never connects


async def test_the_checker_allows_what_the_policy_allows(target: Target) -> None:
    checker = UrlChecker(NetworkConfig(allow_cidrs=("127.0.0.0/8",)), timeout_s=5.0)
    hosts = UrlChecker(NetworkConfig(allow_hosts=("localhost",)), timeout_s=5.0)
    try:
        await checker.check(target.url("/hook"))
        await checker.check(target.url("/hook", host="localhost"))
        await hosts.check(target.url("/hook", host="localhost"))
    finally:
        checker.close()
        hosts.close()


async def test_a_name_that_does_not_resolve_in_time_is_refused_naming_the_setting() -> None:
    release = threading.Event()

    def hanging_resolver(host: str, port: int) -> list[str]:
        release.wait(30)  # a DNS server that never answers
        return ["93.184.216.34"]

    checker = UrlChecker(NetworkConfig(), timeout_s=0.2, resolve=hanging_resolver)
    try:
        with pytest.raises(UrlUnresolvable) as e:
            await checker.check("https://hooks.example.com/x")
    finally:
        release.set()
        checker.close()
    assert str(e.value) == (
        "https://hooks.example.com/x: its host hooks.example.com did not resolve: no answer "
        "within 0.2 s (network.resolve_timeout_s)"
    )
