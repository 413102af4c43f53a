"""The router: owns the upstreams and the catalog, routes agent calls, and tells agents when the catalog changes.

Shared by every agent session. Upstream sessions, tool lists and credentials live here once, whatever the
number of agents. Reload swaps upstreams by diffing configs: unchanged upstreams keep their sessions; the
sessions of replaced ones (shared, and agents' own) close once their calls in flight end, and the agents'
resource subscriptions to a changed upstream are made again in its new sessions.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Final, Protocol

from mcpx import jsonrpc
from mcpx.audit import AuditLog
from mcpx.auth.oauth.credential import OAuthContext, OAuthCredential
from mcpx.busypoll import BusyPoll
from mcpx.config.model import Config, UpstreamConfig
from mcpx.errors import InvalidParams, McpxError, UpstreamUnavailable, unanswered
from mcpx.jsonrpc import Message
from mcpx.log import get_logger
from mcpx.router.catalog import (
    SEPARATOR,
    Catalog,
    ResourceCatalog,
    ToolRoute,
    build_catalog,
    build_resource_catalog,
    expose_content_uris,
    exposed_uri,
    page_cursor,
    page_of,
    paginate,
)
from mcpx.upstream.h1 import HttpClient
from mcpx.upstream.peer import Settled, settle_in_task
from mcpx.upstream.supervisor import (
    LISTS,
    PROMPTS,
    RESOURCES,
    TEMPLATES,
    TOOLS,
    AgentUpstream,
    ManagedUpstream,
    UpstreamState,
)

_log = get_logger("mcpx.router")

_AUDIT_SETTINGS = {"audit", "audit_arguments", "audit_max_bytes", "audit_backups"}

# Called with "tools", "prompts" or "resources" when that catalog changed.
CatalogListener = Callable[[str], None]

# The client capability each server→client request needs (protocol 2025-11-25 `client/*`).
_NEEDED_CAPABILITY: Final = {
    "sampling/createMessage": "sampling",
    "elicitation/create": "elicitation",
    "roots/list": "roots",
}


# URL-mode elicitations whose completion notification mcpx still routes; the oldest is forgotten beyond this.
_MAX_OPEN_ELICITATIONS: Final = 1000


class Agent(Protocol):
    """An agent session as the router sees it (implemented by `downstream.session.AgentSession`)."""

    @property
    def client_capabilities(self) -> dict[str, Any]: ...

    def send_message(self, message: Message) -> None:
        """Deliver a notification to the agent (scrubbed on the way out)."""
        ...

    async def ask(self, method: str, params: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
        """Put a request to the agent: `{"result": …}` or `{"error": …}`."""
        ...


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
        # Connected agents, the most recently joined last; and the agent that last called each upstream.
        self._agents: dict[Agent, None] = {}
        self._last_caller: dict[str, Agent] = {}
        self._private: dict[tuple[Agent, str], AgentUpstream] = {}
        # (upstream, its own URI) → the agents subscribed to it through a shared session
        self._subscriptions: dict[tuple[str, str], set[Agent]] = {}
        # (upstream, elicitationId) of a URL-mode elicitation → the agent that was asked (for its completion)
        self._elicitations: dict[tuple[str, str], Agent] = {}
        self._background: set[asyncio.Task[None]] = set()
        # upstreams (and agents' own sessions) a reload replaced, stopping once their calls in flight are done
        self._retiring: set[ManagedUpstream | AgentUpstream] = set()
        self._generation = 0
        self._pages: dict[str, tuple[bytes, ...]] = dict.fromkeys(LISTS, (b"[]",))
        # The daemon's one event loop polls a moment after each message sent (agents and upstreams alike).
        self.busy_poll = BusyPoll(config.daemon.busy_poll_us)

    async def start(self) -> None:
        self._http = HttpClient(connect_timeout=self.config.daemon.connect_timeout, busy_poll=self.busy_poll)
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

    def pages(self, kind: str) -> tuple[bytes, ...]:
        """The serialized pages of one aggregated list (`LISTS` kind)."""
        return self._pages[kind]

    @property
    def generation(self) -> int:
        """Grows each time a catalog changes (it stamps list cursors)."""
        return self._generation

    async def stop(self) -> None:
        private, self._private = list(self._private.values()), {}
        await asyncio.gather(*(session.close() for session in private))
        # Background upkeep is bounded (10 s each); closing the sessions of agents that just left must finish, so
        # their children are stopped, not orphaned.
        if self._background:
            await asyncio.wait(list(self._background), timeout=5.0)
        for task in list(self._background):
            task.cancel()
        retiring, self._retiring = list(self._retiring), set()
        await asyncio.gather(*(_stop(upstream) for upstream in (*self.upstreams.values(), *retiring)))
        self.upstreams.clear()
        if self._http is not None:
            await self._http.close()
        if self.audit is not None:
            self.audit.close()
        await self.oauth.close()

    # --- configuration -------------------------------------------------------------------------------------------

    def _add(self, upstream_config: UpstreamConfig) -> None:
        assert self._http is not None
        upstream = ManagedUpstream(upstream_config, self.config.daemon, self._http, self.oauth, self)
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
        session_settings = {"socket", "state_dir", "log_level", "busy_poll_us", *_AUDIT_SETTINGS}
        if config.daemon.model_dump(exclude=session_settings) != self.config.daemon.model_dump(
            exclude=session_settings
        ):
            changed = [name for name in new if name in old]  # limits and timeouts live in the sessions
        audit_changed = config.daemon.model_dump(include=_AUDIT_SETTINGS) != self.config.daemon.model_dump(
            include=_AUDIT_SETTINGS
        )
        self.config = config
        self.busy_poll.window = config.daemon.busy_poll_us / 1_000_000
        if audit_changed:
            self._open_audit()
        replaced = {*removed, *changed}
        stopping: list[ManagedUpstream | AgentUpstream] = [self.upstreams.pop(name) for name in replaced]
        private = {key: self._private.pop(key) for key in list(self._private) if key[1] in replaced}
        # The agents' resource subscriptions to a changed upstream are made again in its new sessions.
        carried: dict[tuple[Agent, str], set[str]] = {}
        for (name, uri), subscribers in list(self._subscriptions.items()):
            if name in replaced:
                del self._subscriptions[name, uri]
                for agent in subscribers if name in changed else ():
                    carried.setdefault((agent, name), set()).add(uri)
        for (agent, name), session in private.items():
            if name in changed and session.subscribed:
                carried.setdefault((agent, name), set()).update(session.subscribed)
        # The new upstreams and the catalog are in place before anything is awaited: a call arriving meanwhile
        # waits for the new upstream instead of finding neither.
        for name, upstream_config in new.items():
            if name in added or name in changed:
                self._add(upstream_config)
        # Keep config order in the catalog.
        self.upstreams = {name: self.upstreams[name] for name in new}
        self._rebuild_catalog()
        for (agent, name), uris in carried.items():
            self._carry_subscriptions(agent, self.upstreams[name], uris)
        # Calls in flight finish on the session they started on, shared or the agent's own (new calls go to the
        # new one); an idle upstream or session is stopped before the reload returns.
        stopping += private.values()
        idle = [upstream for upstream in stopping if upstream.idle]
        for upstream in stopping:
            if not upstream.idle:
                self._retiring.add(upstream)
                self._retire(upstream)
        await asyncio.gather(*(_stop(upstream) for upstream in idle))
        await self.oauth.keep_only(upstream.http_url for upstream in config.upstreams if upstream.url is not None)
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
        if changed:
            self._generation += 1
            size = self.config.daemon.list_page_size
            self._pages = {
                TOOLS: paginate(catalog.items, catalog.items_json, size),
                PROMPTS: paginate(prompts.items, prompts.items_json, size),
                RESOURCES: paginate(resources.resources, resources.resources_json, size),
                TEMPLATES: paginate(resources.templates, resources.templates_json, size),
            }
        for kind in changed:
            for listener in list(self._listeners):
                listener(kind)

    # --- calls ---------------------------------------------------------------------------------------------------

    async def call_tool(self, params: dict[str, Any], agent: Agent, call: Agent | None = None) -> Any:
        """Route `tools/call` to the owning upstream under the tool's original name; return the result as is
        (resource URIs in it exposed where the agent needs them to read them back).

        Raises:
            InvalidParams: no such tool in the catalog (MCP: unknown tool is a protocol error, -32602).
            UpstreamError: the upstream could not run it (the session turns this into a tool error).
        """
        route = self._settled_route(params)
        if route is None:
            route = await self._route(TOOLS, params.get("name"))
        forwarded = {**params, "name": route.tool}
        return await self._call(route.upstream, "tools/call", forwarded, agent, call=call)

    def start_call_tool(
        self, params: dict[str, Any], agent: Agent, on_settled: Settled, call: Agent | None = None
    ) -> asyncio.Future[Any]:
        """`call_tool`, started: `on_settled` is told how it ended the moment it ends; the future returned ends
        then too, and cancels the call when cancelled. A known tool of a shared upstream starts without a task
        where the transport can (`UpstreamSession.start_request`); anything else runs as a task.

        `call` (given for an agent speaking protocol 2026-07-28) is where the server's messages related to this
        call go, instead of `agent` itself: it knows the call's capabilities and log level, and puts the server's
        requests to the agent as input requests of the call."""
        route = self._settled_route(params)
        upstream = self.upstreams.get(route.upstream) if route is not None else None
        if route is None or upstream is None:  # (an unknown tool, or one a reload is removing: `call_tool` says why)
            return settle_in_task(functools.partial(self.call_tool, params, agent, call), on_settled)
        forwarded = {**params, "name": route.tool}
        client: _AgentClient | None = None  # (made by `_call` for an agent's own session)
        if upstream.config.shared:
            self._last_caller[route.upstream] = agent
            client = self._client_for(agent, upstream.config, forwarded, call)
            told = _exposing(upstream.config, on_settled) if self._exposes(upstream) else on_settled
            started = upstream.start_request("tools/call", forwarded, client, forward_raw=True, on_settled=told)
            if started is not None:
                return started
        make = functools.partial(self._call, route.upstream, "tools/call", forwarded, agent, client=client, call=call)
        return settle_in_task(make, on_settled)

    def _settled_route(self, params: dict[str, Any]) -> ToolRoute | None:
        """The tool's route in a settled catalog, looked up without awaiting (None: ask `_route`)."""
        name = params.get("name")
        return self.catalog.routes.get(name) if self._settled and isinstance(name, str) else None

    async def get_prompt(self, params: dict[str, Any], agent: Agent, call: Agent | None = None) -> Any:
        """Route `prompts/get` like a tool call; the result comes back as the upstream wrote it."""
        route = await self._route(PROMPTS, params.get("name"))
        return await self._call(route.upstream, "prompts/get", {**params, "name": route.tool}, agent, call=call)

    async def complete(self, params: dict[str, Any], agent: Agent) -> Any:
        """Route `completion/complete` to the upstream of the prompt or resource template it completes."""
        ref = params.get("ref")
        kind = ref.get("type") if isinstance(ref, dict) else None
        if not isinstance(ref, dict) or kind not in ("ref/prompt", "ref/resource"):
            raise InvalidParams('completion/complete needs a "ref" of type ref/prompt or ref/resource')
        if kind == "ref/prompt":
            route = await self._route(PROMPTS, ref.get("name"))
            forwarded = {**params, "ref": {**ref, "name": route.tool}}
        else:
            route = await self._resource_route(ref.get("uri"), "completion/complete")
            forwarded = {**params, "ref": {**ref, "uri": route.tool}}
        return await self._call(route.upstream, "completion/complete", forwarded, agent, expose=False)

    async def read_resource(self, params: dict[str, Any], agent: Agent, call: Agent | None = None) -> Any:
        """Route `resources/read` by URI (see `catalog.ResourceCatalog.route`); the contents name the URI the agent
        asked for."""
        route = await self._resource_route(params.get("uri"), "resources/read")
        upstream = self.upstreams[route.upstream]
        if not upstream.config.namespace:
            return await self._call(route.upstream, "resources/read", params, agent, expose=False, call=call)
        forwarded = {**params, "uri": route.tool}
        result = await self._call(route.upstream, "resources/read", forwarded, agent, raw=False, call=call)
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

    async def subscribe_resource(self, params: dict[str, Any], agent: Agent) -> None:
        """`resources/subscribe`: a shared upstream is asked once per URI, whatever the number of agents; its
        `notifications/resources/updated` then reaches the subscribed agents only."""
        route = await self._resource_route(params.get("uri"), "resources/subscribe")
        forwarded = {**params, "uri": route.tool}
        if not self.upstreams[route.upstream].config.shared:
            await self._call(route.upstream, "resources/subscribe", forwarded, agent, raw=False)
            return
        subscribers = self._subscriptions.get((route.upstream, route.tool))
        if not subscribers:
            await self._call(route.upstream, "resources/subscribe", forwarded, agent, raw=False)
            subscribers = self._subscriptions.setdefault((route.upstream, route.tool), set())
        subscribers.add(agent)

    async def unsubscribe_resource(self, params: dict[str, Any], agent: Agent) -> None:
        route = await self._resource_route(params.get("uri"), "resources/unsubscribe")
        forwarded = {**params, "uri": route.tool}
        if not self.upstreams[route.upstream].config.shared:
            await self._call(route.upstream, "resources/unsubscribe", forwarded, agent, raw=False)
            return
        subscribers = self._subscriptions.get((route.upstream, route.tool), set())
        subscribers.discard(agent)
        if not subscribers and self._subscriptions.pop((route.upstream, route.tool), None) is not None:
            await self._call(route.upstream, "resources/unsubscribe", forwarded, agent, raw=False)

    def unsubscribe_in_background(self, uri: str, agent: Agent) -> None:
        """`unsubscribe_resource` of `uri` for `agent`, as background work of the router (bounded by the connect
        timeout; a failure is logged): an agent's `subscriptions/listen` stream ended, and no answer is owed."""
        self._spawn(self.unsubscribe_resource({"uri": uri}, agent), uri, timeout=self.config.daemon.connect_timeout)

    async def set_log_level(self, params: dict[str, Any], agent: Agent) -> None:
        """Fan `logging/setLevel` out to every ready upstream that offers logging (shared upstreams share it) and
        to the agent's own sessions."""
        targets: list[ManagedUpstream | AgentUpstream] = [
            upstream
            for upstream in self.upstreams.values()
            if upstream.state is UpstreamState.READY and "logging" in upstream.session.capabilities
        ]
        targets += [
            private
            for (owner, _), private in self._private.items()
            if owner is agent and private.session is not None and "logging" in private.session.capabilities
        ]
        outcomes = await asyncio.gather(
            *(upstream.request("logging/setLevel", params, None) for upstream in targets), return_exceptions=True
        )
        for upstream, outcome in zip(targets, outcomes, strict=True):
            if isinstance(outcome, Exception):
                _log.debug("logging/setLevel failed upstream", upstream=upstream.name, error=str(outcome))

    def roots_changed(self, agent: Agent) -> None:
        """An agent's `notifications/roots/list_changed` reaches the upstreams that asked for roots: shared ones
        (they may have asked any agent) and the agent's own sessions."""
        sessions = [upstream.session for upstream in self.upstreams.values() if upstream.state is UpstreamState.READY]
        sessions += [
            private.session for (owner, _), private in self._private.items() if owner is agent and private.session
        ]
        for session in sessions:
            if session.asked_roots:
                self._spawn(session.notify("notifications/roots/list_changed"), session.name)

    def capabilities(self) -> dict[str, Any]:
        """What agents are offered: tools always, the rest when an upstream offers it."""
        offered: dict[str, Any] = {}
        for upstream in self.upstreams.values():
            for name, value in upstream.session.capabilities.items():
                if isinstance(value, dict) and isinstance(offered.get(name), dict):
                    offered[name] = {**offered[name], **value}
                else:
                    offered.setdefault(name, value)
        capabilities: dict[str, Any] = {"tools": {"listChanged": True}}
        if "prompts" in offered:
            capabilities["prompts"] = {"listChanged": True}
        if "completions" in offered:
            capabilities["completions"] = {}
        if "logging" in offered:
            capabilities["logging"] = {}
        resources = offered.get("resources")
        if resources is not None:
            subscribe = isinstance(resources, dict) and resources.get("subscribe") is True
            capabilities["resources"] = {"listChanged": True, **({"subscribe": True} if subscribe else {})}
        return capabilities

    def instructions(self) -> str | None:
        """The upstreams' `instructions`, each under a heading naming its upstream (None when none gave any)."""
        sections = [
            f"## {name}\n\n{upstream.session.instructions.strip()}"
            for name, upstream in self.upstreams.items()
            if upstream.session.instructions and upstream.session.instructions.strip()
        ]
        if not sections:
            return None
        preface = "mcpx serves several MCP servers; the instructions of each follow under its name."
        return "\n\n".join((preface, *sections))

    async def _call(
        self,
        name: str,
        method: str,
        params: dict[str, Any],
        agent: Agent,
        *,
        raw: bool = True,
        expose: bool = True,
        client: _AgentClient | None = None,
        call: Agent | None = None,
    ) -> Any:
        """Send one of the agent's requests to upstream `name` (its shared session or the agent's own), with the
        server's related messages going back to that agent (through `client`, made here unless given, to `call`
        when there is one)."""
        upstream = self.upstreams.get(name)
        if upstream is None:  # a reload removed it while the call was being routed
            raise UpstreamUnavailable(name, "removed from the configuration")
        self._last_caller[name] = agent
        if client is None:
            client = self._client_for(agent, upstream.config, params, call)
        target = self._target(upstream, agent)
        result = await target.request(method, params, client, forward_raw=raw)
        if expose and self._exposes(upstream):
            result = _with_exposed_uris(upstream.config, result)
        return result

    @staticmethod
    def _exposes(upstream: ManagedUpstream) -> bool:
        """Whether resource URIs in this upstream's results are rewritten so that agents can read them back."""
        return upstream.config.namespace and "resources" in upstream.session.capabilities

    def _target(self, upstream: ManagedUpstream, agent: Agent) -> ManagedUpstream | AgentUpstream:
        if upstream.config.shared:
            return upstream
        key = (agent, upstream.name)
        private = self._private.get(key)
        if private is None or private.shared is not upstream:
            private = self._private[key] = AgentUpstream(upstream, _AgentClient(self, agent, upstream.config))
        return private

    def _client_for(
        self, agent: Agent, config: UpstreamConfig, params: dict[str, Any], call: Agent | None = None
    ) -> _AgentClient:
        """The client side of one call. A progress token is replaced by one unique across agents (the agent's own
        comes back on its notifications)."""
        meta = params.get("_meta")
        if not isinstance(meta, dict) or "progressToken" not in meta:
            return _AgentClient(self, agent, config, call=call)
        upstream_token = f"mcpx-{next(self._progress_tokens)}"
        params["_meta"] = {**meta, "progressToken": upstream_token}
        return _AgentClient(self, agent, config, progress=(upstream_token, meta["progressToken"]), call=call)

    async def _resource_route(self, uri: object, method: str) -> ToolRoute:
        if not isinstance(uri, str):
            raise InvalidParams(f'{method} needs a string "uri"')
        if not self.settled:
            await self.wait_settled(self.config.daemon.connect_timeout)
        namespaced = [name for name, upstream in self.upstreams.items() if upstream.config.namespace]
        route = self.resources.route(uri, namespaced)
        if route is None or route.upstream not in self.upstreams:
            raise InvalidParams(f"unknown resource: {uri} (use a URI from resources/list or a template)")
        return route

    # --- agents, and the servers' messages to them -----------------------------------------------------------

    def agent_joined(self, agent: Agent) -> None:
        self._agents[agent] = None

    def agent_left(self, agent: Agent) -> None:
        """The agent is gone: close its own sessions and end its subscriptions (in the background, bounded)."""
        self._agents.pop(agent, None)
        for name in [name for name, caller in self._last_caller.items() if caller is agent]:
            del self._last_caller[name]
        for elicitation in [key for key, owner in self._elicitations.items() if owner is agent]:
            del self._elicitations[elicitation]
        for key in [key for key in self._private if key[0] is agent]:
            private = self._private.pop(key)
            self._spawn(private.close(), private.name)
        for (name, uri), subscribers in list(self._subscriptions.items()):
            if agent in subscribers:
                subscribers.discard(agent)
                if not subscribers:
                    del self._subscriptions[name, uri]
                    upstream = self.upstreams.get(name)
                    if upstream is not None and upstream.state is UpstreamState.READY:
                        self._spawn(upstream.request("resources/unsubscribe", {"uri": uri}, None), name)

    def lists_changed(self) -> None:
        self._rebuild_catalog()

    def connected(self, upstream: str) -> None:
        """A shared upstream's new session knows none of the subscriptions the old one had: renew them."""
        target = self.upstreams.get(upstream)
        if target is None:
            return
        for name, uri in list(self._subscriptions):
            if name == upstream:
                self._spawn(target.request("resources/subscribe", {"uri": uri}, None), upstream)

    def server_notification(self, upstream: str, message: Message) -> None:
        """A shared upstream's notification that belongs to no agent's call."""
        method = message.get("method")
        params = message.get("params")
        params = params if isinstance(params, dict) else {}
        config = self.upstreams[upstream].config if upstream in self.upstreams else None
        if config is None:
            return
        if method == "notifications/resources/updated" and isinstance(params.get("uri"), str):
            exposed = _with_exposed_update(config, message)
            # (copies: the agents may change while this loop sends)
            for agent in tuple(self._subscriptions.get((upstream, params["uri"]), ())):
                agent.send_message(exposed)
        elif method == "notifications/elicitation/complete" and isinstance(params.get("elicitationId"), str):
            asked = self._elicitations.pop((upstream, params["elicitationId"]), None)
            if asked is not None:
                asked.send_message(message)
        elif method == "notifications/message":
            for agent in list(self._agents):
                agent.send_message(message)
        else:
            _log.debug("upstream notification dropped", upstream=upstream, method=method)

    async def server_request(
        self, upstream: str, method: str, params: dict[str, Any] | None, timeout: float
    ) -> dict[str, Any]:
        """A shared upstream's request that belongs to no agent's call goes to the agent that last called that
        upstream if it can answer, else to the most recently connected agent that can."""
        needed = _NEEDED_CAPABILITY.get(method)
        if needed is None or upstream not in self.upstreams:
            return unanswered(method, "mcpx does not relay this request to agents")
        candidates = [self._last_caller.get(upstream), *reversed(self._agents)]
        agent = next((a for a in candidates if a is not None and needed in a.client_capabilities), None)
        if agent is None:
            return unanswered(method, f"no connected agent declared the {needed} capability")
        return await self.ask_agent(agent, self.upstreams[upstream].config, method, params, timeout)

    async def ask_agent(
        self, agent: Agent, config: UpstreamConfig, method: str, params: dict[str, Any] | None, timeout: float
    ) -> dict[str, Any]:
        """Put an upstream's request to `agent`, if it declared the capability the request needs."""
        needed = _NEEDED_CAPABILITY.get(method)
        if needed is None:
            return unanswered(method, "mcpx does not relay this request to agents")
        capability = agent.client_capabilities.get(needed)
        if not isinstance(capability, dict):
            return unanswered(method, f"the agent did not declare the {needed} capability")
        if method == "elicitation/create" and isinstance(params, dict) and params.get("mode") == "url":
            if "url" not in capability:
                return unanswered(method, "the agent does not support URL-mode elicitation")
            elicitation_id = params.get("elicitationId")
            if isinstance(elicitation_id, str):
                if len(self._elicitations) >= _MAX_OPEN_ELICITATIONS:
                    self._elicitations.pop(next(iter(self._elicitations)))
                self._elicitations[config.name, elicitation_id] = agent
        return await agent.ask(method, params, timeout)

    def _carry_subscriptions(self, agent: Agent, upstream: ManagedUpstream, uris: set[str]) -> None:
        """Subscribe `agent` again, through `upstream` (new after a reload), to the resources it was subscribed to:
        a shared upstream subscribes when its session comes up (`connected`); the agent's own session is opened
        now, and subscribes as it opens."""
        if upstream.config.shared:
            for uri in uris:
                self._subscriptions.setdefault((upstream.name, uri), set()).add(agent)
            return
        private = AgentUpstream(upstream, _AgentClient(self, agent, upstream.config), subscribed=uris)
        self._private[agent, upstream.name] = private
        daemon = self.config.daemon
        # (as long as the new upstream's first connection and then the session's own opening may take)
        self._spawn(private.open(), upstream.name, timeout=2 * daemon.connect_timeout + upstream.config.timeout)

    def _retire(self, upstream: ManagedUpstream | AgentUpstream) -> None:
        async def retire() -> None:
            try:
                await upstream.retire()
            finally:
                self._retiring.discard(upstream)

        task = asyncio.get_running_loop().create_task(retire())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _spawn(self, work: Coroutine[Any, Any, Any], upstream: str, *, timeout: float = 10.0) -> None:
        async def guarded() -> None:
            try:
                async with asyncio.timeout(timeout):
                    await work
            except Exception as exc:  # noqa: BLE001 - task top: background upkeep must not end the daemon
                _log.debug("background upstream work failed", upstream=upstream, error=str(exc))

        task = asyncio.get_running_loop().create_task(guarded())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

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
            # A namespaced name of an upstream that is not up: say why (or bring it up), not "unknown". Upstream
            # names may hold the separator too: of those not up whose prefix this name has, the longest.
            owners = [
                upstream
                for prefix, upstream in self.upstreams.items()
                if name.startswith(prefix + SEPARATOR)
                and upstream.config.namespace
                and upstream.state is not UpstreamState.READY
            ]
            pending = max(owners, key=lambda upstream: len(upstream.name), default=None)
            if pending is not None:
                await pending.ensure_ready()
                catalog = self._named(kind)
                route = catalog.routes.get(name)
            if route is None:
                raise InvalidParams(f"unknown {kind[:-1]}: {name}")
        return route

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
                "url": upstream.config.endpoint,
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


async def _stop(upstream: ManagedUpstream | AgentUpstream) -> None:
    if isinstance(upstream, ManagedUpstream):
        await upstream.stop()
    else:
        await upstream.close()


class _AgentClient:
    """The client side of an agent's call (or of its own session): the server's messages reach that agent, its
    progress under the agent's own token, resource URIs as the agent knows them."""

    __slots__ = ("_agent", "_config", "_progress", "_reached", "_router")

    def __init__(
        self,
        router: Router,
        agent: Agent,
        config: UpstreamConfig,
        progress: tuple[str, object] | None = None,
        call: Agent | None = None,
    ) -> None:
        self._router = router
        self._agent = agent
        self._config = config
        self._progress = progress  # (the upstream's token, the agent's token)
        self._reached = agent if call is None else call  # (a 2026-07-28 agent's call takes what is related to it)

    @property
    def agent(self) -> object:
        return self._agent

    def notify(self, message: Message) -> None:
        method = message.get("method")
        params = message.get("params")
        if method == "notifications/progress":
            if (
                self._progress is None
                or not isinstance(params, dict)
                or params.get("progressToken") != self._progress[0]
            ):
                return  # not this call's progress: never guess whose it is
            message = {**message, "params": {**params, "progressToken": self._progress[1]}}
        elif method == "notifications/resources/updated":
            message = _with_exposed_update(self._config, message)
        elif method in _LIST_CHANGED_METHODS:
            return  # the catalog is refreshed from the shared session; agents hear of changes from the router
        self._reached.send_message(message)

    async def ask(self, method: str, params: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
        return await self._router.ask_agent(self._reached, self._config, method, params, timeout)


_LIST_CHANGED_METHODS: Final = frozenset(
    f"notifications/{kind}/list_changed" for kind in ("tools", "prompts", "resources")
)


def _with_exposed_uris(config: UpstreamConfig, result: Any) -> Any:
    """A result with its content's resource URIs as the agent reads them back; forwarded bytes are parsed only
    when they may hold such content."""
    if isinstance(result, jsonrpc.RawJson):
        raw = result.view()
        # Searched where it lies (the whole response holding it: a superset), so a large result is not copied.
        haystack = raw.obj if isinstance(raw, memoryview) else raw
        if not isinstance(haystack, bytes | bytearray):
            haystack = result.data
        if b'"resource' not in haystack:
            return result
        exposed = expose_content_uris(config, jsonrpc.loads(result.data))
        return result if exposed is None else exposed
    exposed = expose_content_uris(config, result)
    return result if exposed is None else exposed


def _exposing(config: UpstreamConfig, on_settled: Settled) -> Settled:
    """`on_settled`, told a result with its resource URIs exposed (`_with_exposed_uris`)."""

    def told(result: Any, error: BaseException | None) -> None:
        if error is None:
            try:
                result = _with_exposed_uris(config, result)
            except McpxError as exc:
                result, error = None, exc
        on_settled(result, error)

    return told


def _with_exposed_update(config: UpstreamConfig, message: Message) -> Message:
    params = message.get("params")
    if not isinstance(params, dict) or not isinstance(params.get("uri"), str):
        return message
    return {**message, "params": {**params, "uri": exposed_uri(config, params["uri"])}}


# Each aggregated list method → its kind and the key of its array in the result.
_LIST_KINDS: Final = {spec.method: (kind, spec.key) for kind, spec in LISTS.items()}
LIST_METHODS: Final = frozenset(_LIST_KINDS)


def list_response(
    request_id: jsonrpc.RequestId, method: str, router: Router, cursor: object = None, extra: bytes = b""
) -> bytes:
    """The full response to one of the `LIST_METHODS`, spliced from the pre-serialized pages of the catalog;
    `extra` is more members of the result, serialized, each with its leading comma.

    Raises:
        InvalidParams: a cursor that is not one this catalog gave (or that a change of the catalog outdated).
    """
    kind, key = _LIST_KINDS[method]
    pages = router.pages(kind)
    page = 0
    if cursor is not None:
        found = page_of(cursor, router.generation, len(pages)) if isinstance(cursor, str) else None
        if found is None:
            raise InvalidParams(f"{method}: invalid or outdated cursor (the list changed); list again from the start")
        page = found
    more = (
        b',"nextCursor":%b' % jsonrpc.dumps(page_cursor(router.generation, page + 1)) if page + 1 < len(pages) else b""
    )
    return b'{"jsonrpc":"2.0","id":%b,"result":{"%b":%b%b%b}}' % (
        jsonrpc.dumps(request_id),
        key.encode(),
        pages[page],
        more,
        extra,
    )
