"""The OAuth requests mcpx makes, as the authorization server receives them."""

from __future__ import annotations

from typing import Any

import aiohttp
from aiohttp import web
from joserfc import jwt
from joserfc.jwk import ECKey

from mcpx.auth.oauth import endpoints
from mcpx.auth.oauth.endpoints import Client
from mcpx.auth.oauth.metadata import validate_server_metadata


async def test_private_key_jwt_assertion_names_the_issuer_as_its_audience() -> None:
    """RFC 7523bis: the client assertion's only audience is the issuer, not the token endpoint the metadata names."""
    forms: list[dict[str, Any]] = []

    async def token(request: web.Request) -> web.Response:
        forms.append(dict(await request.post()))
        return web.json_response({"access_token": "at", "token_type": "Bearer", "expires_in": 60})

    app = web.Application()
    app.router.add_post("/oauth2/token", token)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        issuer = f"http://127.0.0.1:{port}/tenant"
        server = validate_server_metadata(
            {"issuer": issuer, "token_endpoint": f"http://127.0.0.1:{port}/oauth2/token"}, issuer, source="test"
        )
        key = ECKey.generate_key("P-256")
        async with aiohttp.ClientSession() as http:
            answer = await endpoints.token_request(
                http,
                server,
                Client("machine-1", None, "private_key_jwt"),
                {"grant_type": "client_credentials"},
                signing_key=key.as_pem(private=True),
                signing_algorithm="ES256",
            )
    finally:
        await runner.cleanup()
    assert answer["access_token"] == "at"
    (form,) = forms
    assert form["client_assertion_type"] == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    assertion = jwt.decode(form["client_assertion"], key)  # verifies the ES256 signature
    assert assertion.header["alg"] == "ES256"
    assert assertion.claims["aud"] == issuer
    assert assertion.claims["iss"] == assertion.claims["sub"] == form["client_id"] == "machine-1"
    assert assertion.claims["exp"] > assertion.claims["iat"]
