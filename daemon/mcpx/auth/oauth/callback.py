"""The loopback redirect listener of a login (RFC 8252 §7.3): 127.0.0.1 only, one path, one answer.

The browser lands on `http://127.0.0.1:PORT/callback?code=…&state=…`; the listener hands that query to the
login flow (which checks it) and tells the user they can close the tab. A request without the state of the login
in progress (none, or another: a stale tab of an earlier login, any page that knows the port) is no answer to
it: it is answered 400 and the login goes on waiting. It lives only while a login waits.
"""

from __future__ import annotations

import asyncio
import hmac

from aiohttp import web

_PAGE = (
    "<!doctype html><meta charset=utf-8><title>mcpx</title>"
    "<p>mcpx received the authorization. You can close this tab and return to the terminal.</p>"
)
_NOT_A_RESPONSE = "mcpx: this is not an authorization response (it has no state); the login is still waiting."
_NOT_OURS = (
    "mcpx: this authorization response is not for the login in progress (its state differs: an older tab?); "
    "the login is still waiting."
)


class CallbackListener:
    def __init__(self, port: int = 0) -> None:
        self._port = port
        self.answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._runner: web.AppRunner | None = None
        self.redirect_uri = ""
        # The `state` of the authorization request sent with `redirect_uri` (set once it is made).
        self.state: str | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/callback", self._callback)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self._port, reuse_address=False)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        server = site._server
        assert server is not None and server.sockets  # type: ignore[attr-defined]
        port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self.redirect_uri = f"http://127.0.0.1:{port}/callback"

    async def _callback(self, request: web.Request) -> web.Response:
        if not request.query.get("state"):
            # Every authorization response carries the state mcpx sent, errors too (RFC 6749 §4.1.2, §4.1.2.1):
            # anything else is a stray request (a prefetch, another program), which must not end the login.
            return web.Response(status=400, text=_NOT_A_RESPONSE, content_type="text/plain")
        if self.state is None or not hmac.compare_digest(request.query["state"].encode(), self.state.encode()):
            return web.Response(status=400, text=_NOT_OURS, content_type="text/plain")
        if not self.answer.done():
            self.answer.set_result(f"{self.redirect_uri}?{request.query_string}")
        return web.Response(text=_PAGE, content_type="text/html")

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
