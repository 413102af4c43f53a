"""The router: owns the upstreams and the catalog, routes agent calls, and tells agents when the catalog changes.

Shared by every agent session. Upstream sessions, tool lists and credentials live here once, whatever the
number of agents. Reload swaps upstreams by diffing configs: unchanged upstreams keep their sessions.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from mcpx import jsonrpc
from mcpx.audit import AuditLog
from mcpx.auth.oauth.credential import OAuthContext, OAuthCredential
from mcpx.config.model import Config, UpstreamConfig
from mcpx.errors import InvalidParams
from mcpx.jsonrpc import Message
from mcpx.log import get_logger
from mcpx.router.catalog import (
    SEPARATOR,
    Catalog,
    ResourceCatalog,
    ToolRoute,
    build_catalog,
    build_resource_catalog,
    exposed_uri,
)
from mcpx.upstream.h1 import HttpClient
from mcpx.upstream.http import NotificationHandler
from mcpx.upstream.supervisor import LISTS, PROMPTS, RESOURCES, TEMPLATES, TOOLS, ManagedUpstream, UpstreamState

_log = get_logger("mcpx.router")

_AUDIT_SETTINGS = {"audit", "audit_arguments", "audit_max_bytes", "audit_backups"}

# Called with "tools", "prompts" or "resources" when that catalog changed.
CatalogListener = Callable[[str], None]


class Router:
    def __init__(self, config: Config, state_dir: Path) -> None:
        self.config = config
        self.oauth = OAuthContext(state_dir, config.daemon.token_store)
        self.catalog = Catalog()
        self.prompts = Catalog()
        self.resources = ResourceCatalog()
        self.upstreams: dict[str, ManagedUpstream] = {}
        self._listeners: set[CatalogListener] = set()
        self._progress_tokens = itertools.count(1)
        self._http: HttpClient | None = None
        self._settled = False
        self._state_dir = state_dir
        self.audit: AuditLog | None = None

    async def start(self) -> None:
        self._http = HttpClient(connect_timeout=self.config.daemon.connect_timeout)
        self._open_audit()
        for upstream_config in self.config.upstreams:
            self._add(upstream_config)

    def _open_audit(self) -> None:
        if self.audit is not None:
            self.audit.close()
        daemon = self.config.daemon
        self.audit = (
            AuditLog(self._state_dir / "audit.jsonl", max_bytes=daemon.audit_max_bytes, backups=daemon.audit_backups)
            if daemon.audit
            else None
        )

    async def wait_settled(self, timeout: float) -> None:
        """Wait (bounded) until every upstream's first connection attempt has ended, so that an agent's first
        `tools/list` right after the daemon starts sees every upstream that is reachable."""
        pending = [upstream.first_attempt_done.wait() for upstream in self.upstreams.values()]
        if pending:
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.gather(*pending)
            except TimeoutError:
                pass

    @property
    def settled(self) -> bool:
        # Asked on every tools/list and tools/call: once true it stays true until an upstream is added.
        if not self._settled:
            self._settled = all(upstream.first_attempt_done.is_set() for upstream in self.upstreams.values())
        return self._settled

    async def stop(self) -> None:
        await asyncio.gather(*(upstream.stop() for upstream in self.upstreams.values()))
        self.upstreams.clear()
        if self._http is not None:
            await self._http.close()
        if self.audit is not None:
            self.audit.close()
        await self.oauth.close()

    # --- configuration -------------------------------------------------------------------------------------------

    def _add(self, upstream_config: UpstreamConfig) -> None:
        assert self._http is not None
        upstream = ManagedUpstream(upstream_config, self.config.daemon, self._http, self.oauth, self._rebuild_catalog)
        self.upstreams[upstream_config.name] = upstream
        self._settled = False
        upstream.start()

    async def apply(self, config: Config) -> dict[str, list[str]]:
        """Swap in a new config: add, remove and restart upstreams whose settings changed; keep the rest."""
        old = {upstream.name: upstream.config for upstream in self.upstreams.values()}
        new = {upstream.name: upstream for upstream in config.upstreams}
        removed = [name for name in old if name not in new]
        added = [name for name in new if name not in old]
        changed = [name for name in new if name in old and old[name] != new[name]]
        # These do not reach upstream sessions.
        session_settings = {"socket", "state_dir", "log_level", *_AUDIT_SETTINGS}
        if config.daemon.model_dump(exclude=session_settings) != self.config.daemon.model_dump(
            exclude=session_settings
        ):
            changed = [name for name in new if name in old]  # limits and timeouts live in the sessions
        audit_changed = config.daemon.model_dump(include=_AUDIT_SETTINGS) != self.config.daemon.model_dump(
            include=_AUDIT_SETTINGS
        )
        self.config = config
        if audit_changed:
            self._open_audit()
        stopping = [self.upstreams.pop(name) for name in (*removed, *changed)]
        await asyncio.gather(*(upstream.stop() for upstream in stopping))
        for name, upstream_config in new.items():
            if name in added or name in changed:
                self._add(upstream_config)
        # Keep config order in the catalog.
        self.upstreams = {name: self.upstreams[name] for name in new}
        self._rebuild_catalog()
        return {"added": added, "removed": removed, "changed": changed}

    # --- catalog -------------------------------------------------------------------------------------------------

    def subscribe(self, listener: CatalogListener) -> None:
        self._listeners.add(listener)

    def unsubscribe(self, listener: CatalogListener) -> None:
        self._listeners.discard(listener)

    def _rebuild_catalog(self) -> None:
        upstreams = list(self.upstreams.values())
        catalog = build_catalog((upstream.config, upstream.tools) for upstream in upstreams)
        prompts = build_catalog(((upstream.config, upstream.prompts) for upstream in upstreams), tools=False)
        for kind, new, old in (("tool", catalog, self.catalog), ("prompt", prompts, self.prompts)):
            for name, owners in new.collisions.items():
                if name not in old.collisions:
                    _log.warning(f"{kind} name collision: withheld from the catalog", name=name, upstreams=list(owners))
        changed = [
            kind
            for kind, new, old in ((TOOLS, catalog, self.catalog), (PROMPTS, prompts, self.prompts))
            if new.items_json != old.items_json
        ]
        resources = build_resource_catalog(
            (upstream.config, upstream.resources, upstream.templates) for upstream in upstreams
        )
        for uri, owners in resources.collisions.items():
            if uri not in self.resources.collisions:
                _log.warning("resource URI collision: withheld from the catalog", uri=uri, upstreams=list(owners))
        if (resources.resources_json, resources.templates_json) != (
            self.resources.resources_json,
            self.resources.templates_json,
        ):
            changed.append(RESOURCES)
        self.catalog, self.prompts, self.resources = catalog, prompts, resources
        for kind in changed:
            for listener in list(self._listeners):
                listener(kind)

    # --- calls ---------------------------------------------------------------------------------------------------

    async def call_tool(self, params: dict[str, Any], send_to_agent: Callable[[Message], None]) -> Any:
        """Route `tools/call` to the owning upstream under the tool's original name; return the result as is.

        Raises:
            InvalidParams: no such tool in the catalog (MCP: unknown tool is a protocol error, -32602).
            UpstreamError: the upstream could not run it (the session turns this into a tool error).
        """
        route = await self._route(TOOLS, params.get("name"))
        forwarded = {**params, "name": route.tool}
        on_related = self._relay_related(forwarded, send_to_agent)
        return await self.upstreams[route.upstream].request("tools/call", forwarded, on_related, forward_raw=True)

    async def get_prompt(self, params: dict[str, Any]) -> Any:
        """Route `prompts/get` like a tool call; the result comes back as the upstream wrote it."""
        route = await self._route(PROMPTS, params.get("name"))
        forwarded = {**params, "name": route.tool}
        return await self.upstreams[route.upstream].request("prompts/get", forwarded, None, forward_raw=True)

    async def complete(self, params: dict[str, Any]) -> Any:
        """Route `completion/complete` for a prompt argument to the prompt's upstream."""
        ref = params.get("ref")
        if not isinstance(ref, dict) or ref.get("type") != "ref/prompt":
            raise InvalidParams("completion/complete: mcpx completes prompt arguments (ref/prompt) only")
        route = await self._route(PROMPTS, ref.get("name"))
        forwarded = {**params, "ref": {**ref, "name": route.tool}}
        return await self.upstreams[route.upstream].request("completion/complete", forwarded, None, forward_raw=True)

    async def read_resource(self, params: dict[str, Any]) -> Any:
        """Route `resources/read` by URI (see `catalog.ResourceCatalog.route`); the contents name the URI the agent
        asked for."""
        uri = params.get("uri")
        if not isinstance(uri, str):
            raise InvalidParams('resources/read needs a string "uri"')
        if not self.settled:
            await self.wait_settled(self.config.daemon.connect_timeout)
        namespaced = [name for name, upstream in self.upstreams.items() if upstream.config.namespace]
        route = self.resources.route(uri, namespaced)
        if route is None:
            raise InvalidParams(f"unknown resource: {uri} (use a URI from resources/list or a template)")
        upstream = self.upstreams[route.upstream]
        if not upstream.config.namespace:
            return await upstream.request("resources/read", params, None, forward_raw=True)
        result = await upstream.request("resources/read", {**params, "uri": route.tool}, None)
        contents = result.get("contents") if isinstance(result, dict) else None
        if isinstance(contents, list):
            result = {
                **result,
                "contents": [
                    {**item, "uri": exposed_uri(upstream.config, item["uri"])}
                    if isinstance(item, dict) and isinstance(item.get("uri"), str)
                    else item
                    for item in contents
                ],
            }
        return result

    async def set_log_level(self, params: dict[str, Any]) -> None:
        """Fan `logging/setLevel` out to every ready upstream that offers logging (shared upstreams share it)."""
        targets = [
            upstream
            for upstream in self.upstreams.values()
            if upstream.state is UpstreamState.READY and "logging" in upstream.session.capabilities
        ]
        outcomes = await asyncio.gather(
            *(upstream.request("logging/setLevel", params, None) for upstream in targets), return_exceptions=True
        )
        for upstream, outcome in zip(targets, outcomes, strict=True):
            if isinstance(outcome, Exception):
                _log.debug("logging/setLevel failed upstream", upstream=upstream.name, error=str(outcome))

    def capabilities(self) -> dict[str, Any]:
        """What agents are offered: tools always, the rest when an upstream offers it."""
        offered: set[str] = set()
        for upstream in self.upstreams.values():
            offered.update(upstream.session.capabilities)
        capabilities: dict[str, Any] = {"tools": {"listChanged": True}}
        if "prompts" in offered:
            capabilities["prompts"] = {"listChanged": True}
        if "prompts" in offered and "completions" in offered:
            capabilities["completions"] = {}
        if "logging" in offered:
            capabilities["logging"] = {}
        if "resources" in offered:
            capabilities["resources"] = {"listChanged": True}
        return capabilities

    def _named(self, kind: str) -> Catalog:
        return self.catalog if kind == TOOLS else self.prompts

    async def _route(self, kind: str, name: object) -> ToolRoute:
        """The upstream and original name behind an exposed tool or prompt name."""
        if not isinstance(name, str):
            raise InvalidParams(f'a string "name" is needed to find the {kind[:-1]}')
        if not self.settled:
            await self.wait_settled(self.config.daemon.connect_timeout)
        catalog = self._named(kind)
        route = catalog.routes.get(name)
        if route is None:
            # A namespaced name of an upstream that is not up: say why (or bring it up), not "unknown".
            prefix, separator, _ = name.partition(SEPARATOR)
            pending = self.upstreams.get(prefix) if separator else None
            if pending is not None and pending.config.namespace and pending.state is not UpstreamState.READY:
                await pending.ensure_ready()
                catalog = self._named(kind)
                route = catalog.routes.get(name)
            if route is None:
                raise InvalidParams(f"unknown {kind[:-1]}: {name}")
        return route

    def _relay_related(
        self, forwarded: dict[str, Any], send_to_agent: Callable[[Message], None]
    ) -> NotificationHandler | None:
        """Give the upstream a progress token unique across agents, and map its progress back to the caller's."""
        meta = forwarded.get("_meta")
        if not isinstance(meta, dict) or "progressToken" not in meta:
            return None
        agent_token = meta["progressToken"]
        upstream_token = f"mcpx-{next(self._progress_tokens)}"
        forwarded["_meta"] = {**meta, "progressToken": upstream_token}

        def relay(message: Message) -> None:
            params = message.get("params")
            if message.get("method") == "notifications/progress" and isinstance(params, dict):
                if params.get("progressToken") != upstream_token:
                    return
                message = {**message, "params": {**params, "progressToken": agent_token}}
            send_to_agent(message)

        return relay

    # --- status --------------------------------------------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        counts, prompt_counts = self.catalog.counts(), self.prompts.counts()
        withheld: dict[str, list[str]] = {}
        for tool, owners in self.catalog.collisions.items():
            for owner in owners:
                withheld.setdefault(owner, []).append(tool)
        return [
            {
                "name": upstream.name,
                "url": upstream.config.url,
                "state": upstream.state.value,
                "tools": counts.get(upstream.name, 0),
                "prompts": prompt_counts.get(upstream.name, 0),
                "withheld_tools": sorted(withheld.get(upstream.name, [])),
                "last_error": upstream.last_error,
                "auth": upstream.credentials.describe(),
                **(
                    {"oauth": upstream.credentials.status()}
                    if isinstance(upstream.credentials, OAuthCredential)
                    else {}
                ),
                "protocol_version": upstream.session.protocol_version,
                "server": upstream.session.server_info.get("name"),
            }
            for upstream in self.upstreams.values()
        ]


def _serialized_list(kind: str) -> Callable[[Router], bytes]:
    return {
        TOOLS: lambda router: router.catalog.items_json,
        PROMPTS: lambda router: router.prompts.items_json,
        RESOURCES: lambda router: router.resources.resources_json,
        TEMPLATES: lambda router: router.resources.templates_json,
    }[kind]


# Each aggregated list method → its response with two holes (the id, the list) and where its list comes from.
_LIST_RESPONSES: Final = {
    spec.method: (b'{"jsonrpc":"2.0","id":%%b,"result":{"%b":%%b}}' % spec.key.encode(), _serialized_list(kind))
    for kind, spec in LISTS.items()
}
LIST_METHODS: Final = frozenset(_LIST_RESPONSES)


def list_response(request_id: jsonrpc.RequestId, method: str, router: Router) -> bytes:
    """The full response to one of the `LIST_METHODS`, spliced from the pre-serialized catalog."""
    template, serialized = _LIST_RESPONSES[method]
    return template % (jsonrpc.dumps(request_id), serialized(router))
