"""The OAuth test fixtures themselves (tests/support/oauth_server.py), driven by plain aiohttp: no mcpx code."""

from __future__ import annotations

import base64
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit

import aiohttp
import pytest

from tests.support.oauth import protected
from tests.support.oauth_server import (
    DEVICE_CODE_GRANT,
    WRONG_ISSUER,
    AuthorizationFailed,
    AuthServer,
    MetadataDocumentHost,
    ProtectedUpstream,
    follow_authorization,
    s256,
)

REDIRECT = "http://127.0.0.1:43123/callback"
JSON_RPC_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


@dataclass
class Tokens:
    access: str
    refresh: str | None
    body: dict[str, Any]


class Flow:
    """A minimal OAuth client written against the specs, independent of the fixture's internals."""

    def __init__(self, http: aiohttp.ClientSession, auth: AuthServer) -> None:
        self.http = http
        self.auth = auth
        self.client_id = ""
        self.client_secret: str | None = None

    async def register(self, **extra: Any) -> dict[str, Any]:
        body = {
            "client_name": "fixture-test",
            "application_type": "native",
            "redirect_uris": ["http://127.0.0.1/callback"],
            "grant_types": ["authorization_code", "refresh_token"],
            "token_endpoint_auth_method": "none",
        } | extra
        async with self.http.post(self.auth.endpoint("register"), json=body) as response:
            assert response.status == 201, await response.text()
            answer: dict[str, Any] = await response.json()
        self.client_id = answer["client_id"]
        self.client_secret = answer.get("client_secret")
        return answer

    def authorization_url(self, verifier: str, *, resource: str | None, scope: str | None = None, **extra: str) -> str:
        params = {
            "response_type": "code",
            "client_id": self.client_id,
            "redirect_uri": REDIRECT,
            "code_challenge": s256(verifier),
            "code_challenge_method": "S256",
            "state": "st-1",
        } | extra
        if resource is not None:
            params["resource"] = resource
        if scope is not None:
            params["scope"] = scope
        return f"{self.auth.endpoint('authorize')}?{urlencode(params)}"

    async def code(self, verifier: str, *, resource: str | None, scope: str | None = None) -> dict[str, str]:
        location = await follow_authorization(self.authorization_url(verifier, resource=resource, scope=scope))
        assert location.startswith(REDIRECT + "?")
        return dict(parse_qsl(urlsplit(location).query))

    async def token(self, form: dict[str, str], *, basic: bool = False) -> tuple[int, dict[str, Any]]:
        headers = {}
        form = dict(form)
        if basic:
            assert self.client_secret is not None
            raw = f"{self.client_id}:{self.client_secret}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(raw).decode()
        else:
            form["client_id"] = self.client_id
            if self.client_secret is not None:
                form["client_secret"] = self.client_secret
        async with self.http.post(self.auth.endpoint("token"), data=form, headers=headers) as response:
            if response.content_type != "application/json":
                return response.status, {"text": await response.text()}
            body: dict[str, Any] = await response.json()
            if response.status == 200:
                assert response.headers["Cache-Control"] == "no-store"
            return response.status, body

    async def login(self, resource: str | None, scope: str | None = None) -> Tokens:
        verifier = secrets.token_urlsafe(48)
        params = await self.code(verifier, resource=resource, scope=scope)
        form = {"grant_type": "authorization_code", "code": params["code"], "redirect_uri": REDIRECT}
        form["code_verifier"] = verifier
        if resource is not None:
            form["resource"] = resource
        status, body = await self.token(form)
        assert status == 200, body
        return Tokens(body["access_token"], body.get("refresh_token"), body)

    async def refresh(self, refresh_token: str) -> tuple[int, dict[str, Any]]:
        return await self.token({"grant_type": "refresh_token", "refresh_token": refresh_token})


class McpPeer:
    """Raw streamable-HTTP JSON-RPC against an upstream (json_response mode)."""

    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http = http
        self.url = url
        self.session_id: str | None = None
        self.next_id = 0

    def headers(self, token: str | None) -> dict[str, str]:
        headers = dict(JSON_RPC_HEADERS)
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if self.session_id is not None:
            headers["Mcp-Session-Id"] = self.session_id
            headers["MCP-Protocol-Version"] = "2025-11-25"
        return headers

    async def post(self, token: str | None, method: str, params: dict[str, Any]) -> aiohttp.ClientResponse:
        self.next_id += 1
        message = {"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params}
        async with self.http.post(self.url, json=message, headers=self.headers(token)) as response:
            await response.read()
            return response

    async def initialize(self, token: str) -> None:
        response = await self.post(token, "initialize", {"protocolVersion": "2025-11-25", "capabilities": {}})
        assert response.status == 200
        self.session_id = response.headers["Mcp-Session-Id"]
        notification = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        async with self.http.post(self.url, json=notification, headers=self.headers(token)) as answer:
            assert answer.status == 202

    async def call(self, token: str, tool: str, arguments: dict[str, Any]) -> str:
        self.next_id += 1
        message = {"jsonrpc": "2.0", "id": self.next_id, "method": "tools/call"}
        message["params"] = {"name": tool, "arguments": arguments}
        async with self.http.post(self.url, json=message, headers=self.headers(token)) as response:
            assert response.status == 200
            body = await response.json()
        assert "result" in body, body
        text: str = body["result"]["content"][0]["text"]
        return text


def challenge_params(header: str) -> dict[str, str]:
    scheme, _, rest = header.partition(" ")
    assert scheme == "Bearer"
    params = {}
    for part in rest.split(", "):
        key, _, value = part.partition("=")
        params[key] = value.strip('"')
    return params


# ---- metadata discovery


@pytest.mark.parametrize(
    ("style", "issuer_path", "served"),
    [
        ("oauth", "", ["/.well-known/oauth-authorization-server"]),
        ("oauth", "/tenant1", ["/.well-known/oauth-authorization-server/tenant1"]),
        ("openid", "", ["/.well-known/openid-configuration"]),
        (
            "openid",
            "/tenant1",
            ["/.well-known/openid-configuration/tenant1", "/tenant1/.well-known/openid-configuration"],
        ),
    ],
)
async def test_metadata_is_served_only_where_the_style_says(
    http: aiohttp.ClientSession, style: Literal["oauth", "openid"], issuer_path: str, served: list[str]
) -> None:
    candidates = {
        "/.well-known/oauth-authorization-server",
        "/.well-known/oauth-authorization-server/tenant1",
        "/.well-known/openid-configuration",
        "/.well-known/openid-configuration/tenant1",
        "/tenant1/.well-known/openid-configuration",
    }
    async with AuthServer(issuer_path=issuer_path, metadata_style=style) as auth:
        assert auth.issuer == f"http://127.0.0.1:{auth.port}{issuer_path}"
        for path in sorted(candidates):
            async with http.get(auth.origin + path) as response:
                if path in served:
                    assert response.status == 200, path
                    doc = await response.json()
                    assert doc["issuer"] == auth.issuer
                    assert doc["authorization_endpoint"] == f"{auth.issuer}/authorize"
                    assert doc["token_endpoint"] == f"{auth.issuer}/token"
                    assert doc["registration_endpoint"] == f"{auth.issuer}/register"
                    assert doc["code_challenge_methods_supported"] == ["S256"]
                    assert doc["authorization_response_iss_parameter_supported"] is True
                    assert doc["scopes_supported"] == ["mcp:read", "mcp:write"]
                    assert "device_authorization_endpoint" not in doc
                else:
                    assert response.status == 404, path
        assert auth.metadata_url == auth.origin + served[0]


async def test_metadata_knobs(http: aiohttp.ClientSession) -> None:
    async with AuthServer(
        wrong_issuer_in_metadata=True,
        advertise_s256=False,
        advertise_iss=False,
        authorization_endpoint_override="javascript:alert(1)",
        dcr=False,
        cimd=True,
        device_grant=True,
    ) as auth:
        async with http.get(auth.metadata_url) as response:
            doc = await response.json()
        assert doc["issuer"] == WRONG_ISSUER != auth.issuer
        assert "code_challenge_methods_supported" not in doc
        assert "authorization_response_iss_parameter_supported" not in doc
        assert doc["authorization_endpoint"] == "javascript:alert(1)"
        assert "registration_endpoint" not in doc
        assert doc["client_id_metadata_document_supported"] is True
        assert doc["device_authorization_endpoint"] == f"{auth.issuer}/device_authorization"
        assert DEVICE_CODE_GRANT in doc["grant_types_supported"]
        async with http.post(f"{auth.issuer}/register", json={"redirect_uris": [REDIRECT]}) as response:
            assert response.status == 404


# ---- registration, authorization code, PKCE, resource, iss


async def test_dcr_authorization_code_pkce_and_iss(http: aiohttp.ClientSession) -> None:
    async with AuthServer(issuer_path="/tenant1") as auth:
        flow = Flow(http, auth)
        registered = await flow.register()
        assert registered["token_endpoint_auth_method"] == "none"
        assert "client_secret" not in registered
        assert auth.registrations[0]["application_type"] == "native"
        assert auth.registrations[0]["redirect_uris"] == ["http://127.0.0.1/callback"]

        verifier = secrets.token_urlsafe(48)
        resource = "http://127.0.0.1:9/mcp"
        # The registered loopback redirect URI has no port; any port is accepted (RFC 8252 section 7.3).
        params = await flow.code(verifier, resource=resource, scope="mcp:read")
        assert params["state"] == "st-1"
        assert params["iss"] == auth.issuer
        assert auth.authorization_requests[-1]["resource"] == resource
        assert auth.authorization_requests[-1]["scope"] == "mcp:read"

        form = {"grant_type": "authorization_code", "code": params["code"], "redirect_uri": REDIRECT}
        status, body = await flow.token(form | {"code_verifier": "x" * 43, "resource": resource})
        assert (status, body["error"]) == (400, "invalid_grant")  # wrong PKCE verifier
        status, body = await flow.token(form | {"code_verifier": verifier, "resource": resource})
        assert status == 200
        assert body["token_type"] == "Bearer"
        assert body["expires_in"] == 3600
        assert body["scope"] == "mcp:read"
        assert body["refresh_token"] != body["access_token"]
        info = auth.verify(body["access_token"])
        assert info is not None
        assert (info.client_id, info.scopes, info.resource) == (flow.client_id, ("mcp:read",), resource)
        assert auth.token_requests == ["authorization_code", "authorization_code"]

        # Codes are one-time; replaying one revokes what it produced.
        status, replay = await flow.token(form | {"code_verifier": verifier, "resource": resource})
        assert (status, replay["error"]) == (400, "invalid_grant")
        assert auth.verify(body["access_token"]) is None
        assert auth.is_revoked(body["refresh_token"])
        assert auth.invalid_grant_count == 2


@pytest.mark.parametrize(("mode", "expected"), [("missing", None), ("wrong", WRONG_ISSUER)])
async def test_iss_parameter_knob(
    http: aiohttp.ClientSession, mode: Literal["missing", "wrong"], expected: str
) -> None:
    async with AuthServer(iss_parameter=mode) as auth:
        flow = Flow(http, auth)
        await flow.register()
        params = await flow.code("v" * 43, resource=None)
        assert params.get("iss") == expected


async def test_resource_must_match_the_authorization_request(http: aiohttp.ClientSession) -> None:
    async with AuthServer() as auth:
        flow = Flow(http, auth)
        await flow.register()
        verifier = "v" * 43
        params = await flow.code(verifier, resource="http://127.0.0.1:9/mcp")
        form = {"grant_type": "authorization_code", "code": params["code"], "redirect_uri": REDIRECT}
        form["code_verifier"] = verifier
        for resource in ("http://127.0.0.1:10/mcp", None):
            attempt = form if resource is None else form | {"resource": resource}
            status, body = await flow.token(attempt)
            assert (status, body["error"]) == (400, "invalid_target")
        status, body = await flow.token(form | {"resource": "http://127.0.0.1:9/mcp"})
        assert status == 200


async def test_authorization_endpoint_errors(http: aiohttp.ClientSession) -> None:
    async with AuthServer(pre_registered={"app": None}) as auth:
        flow = Flow(http, auth)
        flow.client_id = "app"
        with pytest.raises(AuthorizationFailed, match="invalid_client"):
            flow.client_id = "nobody"
            await follow_authorization(flow.authorization_url("v" * 43, resource=None))
        flow.client_id = "app"
        with pytest.raises(AuthorizationFailed, match="redirect_uri not registered"):
            await follow_authorization(
                flow.authorization_url("v" * 43, resource=None, redirect_uri="http://127.0.0.1:5/elsewhere")
            )
        with pytest.raises(AuthorizationFailed, match="code_challenge_method") as failed:
            await follow_authorization(flow.authorization_url("v" * 43, resource=None, code_challenge_method="plain"))
        assert failed.value.location is not None
        assert dict(parse_qsl(urlsplit(failed.value.location).query))["state"] == "st-1"
        with pytest.raises(AuthorizationFailed, match="invalid_scope"):
            await follow_authorization(flow.authorization_url("v" * 43, resource=None, scope="mcp:everything"))
        auth.deny_authorization = True
        location = await follow_authorization(flow.authorization_url("v" * 43, resource=None), allow_error=True)
        assert dict(parse_qsl(urlsplit(location).query))["error"] == "access_denied"


# ---- refresh tokens: strict rotation


async def test_strict_rotation_and_family_revocation_on_reuse(http: aiohttp.ClientSession) -> None:
    async with AuthServer() as auth:
        flow = Flow(http, auth)
        await flow.register()
        first = await flow.login("http://127.0.0.1:9/mcp")
        assert first.refresh is not None
        status, second = await flow.refresh(first.refresh)
        assert status == 200
        assert second["refresh_token"] != first.refresh
        assert second["scope"] == "mcp:read mcp:write"
        assert auth.refresh_count == 1
        status, third = await flow.refresh(second["refresh_token"])
        assert status == 200
        assert auth.verify(third["access_token"]) is not None

        # A rotated-out refresh token comes back: assume theft and kill the whole family.
        status, reused = await flow.refresh(first.refresh)
        assert (status, reused["error"]) == (400, "invalid_grant")
        for token in (first.access, second["access_token"], third["access_token"]):
            assert auth.verify(token) is None
        assert auth.is_revoked(third["refresh_token"])
        status, after = await flow.refresh(third["refresh_token"])
        assert (status, after["error"]) == (400, "invalid_grant")
        assert auth.token_requests == ["authorization_code", *["refresh_token"] * 4]
        assert auth.refresh_count == 2
        assert auth.invalid_grant_count == 2
        assert auth.families_revoked == 1
        assert "redacted" in repr(auth.revoked)


async def test_refresh_may_narrow_scope_and_server_side_revocation(http: aiohttp.ClientSession) -> None:
    async with AuthServer() as auth:
        flow = Flow(http, auth)
        await flow.register()
        tokens = await flow.login("http://127.0.0.1:9/mcp")
        assert tokens.refresh is not None
        status, body = await flow.token(
            {"grant_type": "refresh_token", "refresh_token": tokens.refresh} | {"scope": "mcp:admin"}
        )
        assert (status, body["error"]) == (400, "invalid_scope")
        status, body = await flow.token(
            {"grant_type": "refresh_token", "refresh_token": tokens.refresh, "scope": "mcp:read"}
        )
        assert (status, body["scope"]) == (200, "mcp:read")
        auth.revoke_all_tokens()
        status, body = await flow.refresh(body["refresh_token"])
        assert (status, body["error"]) == (400, "invalid_grant")


async def test_token_endpoint_failure_knob(http: aiohttp.ClientSession) -> None:
    async with AuthServer(token_endpoint_failure=503) as auth:
        flow = Flow(http, auth)
        await flow.register()
        status, _ = await flow.refresh("whatever")
        assert status == 503
        auth.token_endpoint_failure = None
        status, body = await flow.refresh("whatever")
        assert (status, body["error"]) == (400, "invalid_grant")


# ---- confidential clients, client credentials, revocation


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
async def test_confidential_client_and_client_credentials(http: aiohttp.ClientSession, method: str) -> None:
    async with AuthServer() as auth:
        flow = Flow(http, auth)
        registered = await flow.register(token_endpoint_auth_method=method)
        assert registered["client_secret"]
        basic = method == "client_secret_basic"
        status, body = await flow.token({"grant_type": "client_credentials", "scope": "mcp:read"}, basic=basic)
        assert status == 200
        assert "refresh_token" not in body
        assert auth.verify(body["access_token"]) is not None
        tokens = await flow.login("http://127.0.0.1:9/mcp")
        assert tokens.refresh is not None
        flow.client_secret = "wrong"
        status, body = await flow.token({"grant_type": "client_credentials"}, basic=basic)
        assert (status, body["error"]) == (401, "invalid_client")
        status, body = await flow.refresh(tokens.refresh)
        assert (status, body["error"]) == (401, "invalid_client")


async def test_public_clients_cannot_use_client_credentials_and_revocation(http: aiohttp.ClientSession) -> None:
    async with AuthServer() as auth:
        flow = Flow(http, auth)
        await flow.register()
        status, body = await flow.token({"grant_type": "client_credentials"})
        assert (status, body["error"]) == (400, "unauthorized_client")
        tokens = await flow.login("http://127.0.0.1:9/mcp")
        assert tokens.refresh is not None
        form = {"token": tokens.refresh, "token_type_hint": "refresh_token", "client_id": flow.client_id}
        async with http.post(auth.endpoint("revoke"), data=form) as response:
            assert response.status == 200
        assert auth.is_revoked(tokens.refresh)
        assert auth.verify(tokens.access) is None  # a refresh token takes its access tokens with it
        assert auth.revocation_requests == ["refresh_token"]


async def test_registration_auth_method_knob_and_revocation_needs_client_authentication(
    http: aiohttp.ClientSession,
) -> None:
    async with AuthServer(registration_auth_method="client_secret_basic") as auth:
        flow = Flow(http, auth)
        registered = await flow.register()  # asks for "none"; the server decides otherwise
        assert registered["token_endpoint_auth_method"] == "client_secret_basic" and registered["client_secret"]
        tokens = await flow.login("http://127.0.0.1:9/mcp")
        assert tokens.refresh is not None
        form = {"token": tokens.refresh, "token_type_hint": "refresh_token", "client_id": flow.client_id}
        async with http.post(auth.endpoint("revoke"), data=form) as response:
            assert response.status == 401  # a confidential client must authenticate
        assert not auth.is_revoked(tokens.refresh) and not auth.revocation_requests
        basic = base64.b64encode(f"{flow.client_id}:{flow.client_secret}".encode()).decode()
        headers = {"Authorization": f"Basic {basic}"}
        async with http.post(auth.endpoint("revoke"), data=form, headers=headers) as response:
            assert response.status == 200
        assert auth.is_revoked(tokens.refresh) and auth.revocation_requests == ["refresh_token"]


# ---- client ID metadata documents


async def test_client_id_metadata_document(http: aiohttp.ClientSession) -> None:
    async with AuthServer(cimd=True, dcr=False) as auth, MetadataDocumentHost() as host:
        client_id = host.url("/client.json")
        host.publish("/client.json", {"client_id": client_id, "redirect_uris": ["http://127.0.0.1/callback"]})
        host.publish("/liar.json", {"client_id": "http://elsewhere/", "redirect_uris": ["http://127.0.0.1/callback"]})
        flow = Flow(http, auth)
        flow.client_id = client_id
        tokens = await flow.login("http://127.0.0.1:9/mcp")
        info = auth.verify(tokens.access)
        assert info is not None
        assert info.client_id == client_id
        assert auth.cimd_fetches == [client_id]
        flow.client_id = host.url("/liar.json")
        with pytest.raises(AuthorizationFailed, match="invalid_client"):
            await follow_authorization(flow.authorization_url("v" * 43, resource=None))


# ---- device authorization grant


async def test_device_grant_pending_then_approved(http: aiohttp.ClientSession) -> None:
    async with AuthServer(device_grant=True, pre_registered={"tv": None}) as auth:
        form = {"client_id": "tv", "scope": "mcp:read", "resource": "http://127.0.0.1:9/mcp"}
        async with http.post(auth.endpoint("device_authorization"), data=form) as response:
            assert response.status == 200
            device = await response.json()
        assert device["user_code"] == auth.device_user_codes[-1]
        assert device["interval"] == 1
        flow = Flow(http, auth)
        flow.client_id = "tv"
        poll = {"grant_type": DEVICE_CODE_GRANT, "device_code": device["device_code"]}
        status, body = await flow.token(poll)
        assert (status, body["error"]) == (400, "authorization_pending")
        auth.approve_device(device["user_code"])
        status, body = await flow.token(poll)
        assert status == 200
        info = auth.verify(body["access_token"])
        assert info is not None
        assert (info.scopes, info.resource) == (("mcp:read",), "http://127.0.0.1:9/mcp")
        status, body = await flow.token(poll)
        assert (status, body["error"]) == (400, "invalid_grant")
        with pytest.raises(KeyError):
            auth.approve_device("NOPE-NOPE")


async def test_device_grant_denied(http: aiohttp.ClientSession) -> None:
    async with AuthServer(device_grant=True, pre_registered={"tv": None}) as auth:
        async with http.post(auth.endpoint("device_authorization"), data={"client_id": "tv"}) as response:
            device = await response.json()
        auth.deny_device(device["user_code"])
        flow = Flow(http, auth)
        flow.client_id = "tv"
        status, body = await flow.token({"grant_type": DEVICE_CODE_GRANT, "device_code": device["device_code"]})
        assert (status, body["error"]) == (400, "access_denied")


async def test_device_grant_verification_uri_slow_down_expiry_and_client_grant_types(
    http: aiohttp.ClientSession,
) -> None:
    async with AuthServer(
        device_grant=True,
        device_poll_interval=0.05,
        device_slow_down=1,
        device_code_ttl=30,
        pre_registered={"tv": None},
    ) as auth:
        form = {"client_id": "tv", "scope": "mcp:read", "resource": "http://127.0.0.1:9/mcp"}
        async with http.post(auth.endpoint("device_authorization"), data=form) as response:
            device = await response.json()
        assert auth.device_authorization_requests == [form]
        assert (device["interval"], device["expires_in"]) == (0.05, 30)
        flow = Flow(http, auth)
        flow.client_id = "tv"
        poll = {"grant_type": DEVICE_CODE_GRANT, "device_code": device["device_code"]}
        # The first poll is told to slow down whatever its timing; then the code is pending.
        assert (await flow.token(poll))[1]["error"] == "slow_down"
        assert (await flow.token(poll))[1]["error"] == "authorization_pending"
        assert len(auth.device_polls) == 2
        # The verification URI approves the code the complete URI carries, as a browser opening it would.
        async with http.get(device["verification_uri_complete"]) as response:
            assert (response.status, await response.text()) == (200, "approved")
        async with http.get(device["verification_uri_complete"]) as response:
            assert response.status == 400  # answered already
        status, body = await flow.token(poll)
        assert status == 200 and auth.verify(body["access_token"]) is not None

        # The code typed in, and denied.
        async with http.post(auth.endpoint("device_authorization"), data={"client_id": "tv"}) as response:
            device = await response.json()
        entered = {"user_code": device["user_code"].lower(), "decision": "deny"}
        async with http.post(device["verification_uri"], data=entered) as response:
            assert (response.status, await response.text()) == (200, "denied")
        poll = {"grant_type": DEVICE_CODE_GRANT, "device_code": device["device_code"]}
        assert (await flow.token(poll))[1]["error"] == "slow_down"
        assert (await flow.token(poll))[1]["error"] == "access_denied"

        # A code past its lifetime.
        auth.device_code_ttl = 0
        async with http.post(auth.endpoint("device_authorization"), data={"client_id": "tv"}) as response:
            device = await response.json()
        assert device["expires_in"] == 0
        status, body = await flow.token({"grant_type": DEVICE_CODE_GRANT, "device_code": device["device_code"]})
        assert (status, body["error"]) == (400, "expired_token")

        # A registration without the device grant may not use it; one with it may.
        await flow.register()
        async with http.post(auth.endpoint("device_authorization"), data={"client_id": flow.client_id}) as response:
            assert (response.status, (await response.json())["error"]) == (400, "unauthorized_client")
        await flow.register(grant_types=[DEVICE_CODE_GRANT, "refresh_token"], redirect_uris=[], response_types=[])
        async with http.post(auth.endpoint("device_authorization"), data={"client_id": flow.client_id}) as response:
            assert response.status == 200


async def test_device_grant_verification_uri_override(http: aiohttp.ClientSession) -> None:
    async with AuthServer(
        device_grant=True, device_verification_uri="http://evil.example/device", pre_registered={"tv": None}
    ) as auth:
        async with http.post(auth.endpoint("device_authorization"), data={"client_id": "tv"}) as response:
            device = await response.json()
        assert device["verification_uri"] == "http://evil.example/device"
        assert "verification_uri_complete" not in device


# ---- the protected upstream


async def test_protected_upstream_accepts_audience_bound_tokens_and_challenges_expired_ones(
    http: aiohttp.ClientSession,
) -> None:
    async with AuthServer() as auth, ProtectedUpstream(auth, name="prot") as upstream:
        flow = Flow(http, auth)
        await flow.register()
        peer = McpPeer(http, upstream.url)

        response = await peer.post(None, "initialize", {"protocolVersion": "2025-11-25", "capabilities": {}})
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == (
            f'Bearer resource_metadata="{upstream.prm_url}", scope="mcp:read"'
        )

        other = await flow.login("http://127.0.0.1:9/mcp")  # a token for another resource
        response = await peer.post(other.access, "initialize", {"protocolVersion": "2025-11-25", "capabilities": {}})
        assert response.status == 401
        assert challenge_params(response.headers["WWW-Authenticate"])["error"] == "invalid_token"

        tokens = await flow.login(upstream.url)
        await peer.initialize(tokens.access)
        assert await peer.call(tokens.access, "echo", {"text": "hi"}) == "prot:hi"
        assert await peer.call(tokens.access, "whoami", {}) == f"prot:{flow.client_id}:mcp:read mcp:write"

        auth.expire_access_tokens()
        response = await peer.post(tokens.access, "tools/list", {})
        assert response.status == 401
        params = challenge_params(response.headers["WWW-Authenticate"])
        assert params["resource_metadata"] == upstream.prm_url
        assert params["scope"] == "mcp:read"

        assert tokens.refresh is not None
        status, body = await flow.refresh(tokens.refresh)
        assert status == 200
        assert await peer.call(body["access_token"], "echo", {"text": "again"}) == "prot:again"
        assert upstream.rejected_401 == 3
        assert upstream.bearer_requests == 7


async def test_admin_reset_needs_step_up(http: aiohttp.ClientSession) -> None:
    async with AuthServer() as auth, ProtectedUpstream(auth) as upstream:
        flow = Flow(http, auth)
        await flow.register()
        peer = McpPeer(http, upstream.url)
        tokens = await flow.login(upstream.url)
        await peer.initialize(tokens.access)
        response = await peer.post(tokens.access, "tools/call", {"name": "admin_reset", "arguments": {}})
        assert response.status == 403
        assert response.headers["WWW-Authenticate"] == (
            f'Bearer error="insufficient_scope", scope="mcp:read mcp:admin", resource_metadata="{upstream.prm_url}"'
        )
        assert upstream.rejected_403 == 1
        assert upstream.admin_resets == 0

        admin = await flow.login(upstream.url, scope="mcp:read mcp:admin")
        assert await peer.call(admin.access, "admin_reset", {}) == "protected:reset"
        assert upstream.admin_resets == 1


@pytest.mark.parametrize("location", ["path", "root"])
async def test_protected_resource_metadata_location(
    http: aiohttp.ClientSession, location: Literal["path", "root"]
) -> None:
    async with AuthServer(issuer_path="/t") as auth, ProtectedUpstream(auth, prm_location=location) as upstream:
        origin = f"http://127.0.0.1:{upstream.port}"
        path_url = f"{origin}/.well-known/oauth-protected-resource/mcp"
        root_url = f"{origin}/.well-known/oauth-protected-resource"
        served, missing = (path_url, root_url) if location == "path" else (root_url, path_url)
        assert upstream.prm_url == served
        async with http.get(served) as response:
            assert response.status == 200
            assert await response.json() == {
                "resource": upstream.url,
                "authorization_servers": [auth.issuer],
                "scopes_supported": ["mcp:read", "mcp:write"],
                "bearer_methods_supported": ["header"],
            }
        async with http.get(missing) as response:
            assert response.status == 404
        async with http.post(upstream.url, json={}, headers=JSON_RPC_HEADERS) as response:
            assert response.status == 401
            assert challenge_params(response.headers["WWW-Authenticate"])["resource_metadata"] == served


async def test_plain_challenge_and_wrong_prm_resource(http: aiohttp.ClientSession) -> None:
    async with (
        AuthServer() as auth,
        ProtectedUpstream(auth, challenge_header=False, prm_resource_override="https://evil.example/mcp") as upstream,
    ):
        async with http.post(upstream.url, json={}, headers=JSON_RPC_HEADERS) as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"] == "Bearer"
        async with http.get(upstream.prm_url) as response:
            assert (await response.json())["resource"] == "https://evil.example/mcp"


async def test_servers_that_fail_to_start_leave_nothing_running(monkeypatch: pytest.MonkeyPatch) -> None:
    """`protected()` stops its authorization server when the upstream cannot start, and the upstream closes the
    port it reserved."""
    stopped: list[object] = []
    original = {cls: cls.stop for cls in (AuthServer, ProtectedUpstream)}

    def recording(cls: Any) -> Any:
        async def stop(self: Any) -> None:
            stopped.append(cls)
            await original[cls](self)

        return stop

    async def refuse(self: ProtectedUpstream) -> None:
        raise OSError("cannot listen")

    for cls in original:
        monkeypatch.setattr(cls, "stop", recording(cls))
    monkeypatch.setattr(ProtectedUpstream, "start", refuse)
    with pytest.raises(OSError, match="cannot listen"):
        async with protected():
            pass
    assert stopped == [ProtectedUpstream, AuthServer]
