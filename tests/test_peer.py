"""The server's requests to the client, as every upstream transport handles them (`upstream/peer.py`): answered,
withdrawn when the server cancels them or their call ends, `ping` answered by mcpx, and bounded."""

from __future__ import annotations

import asyncio
from typing import Any

from mcpx import jsonrpc
from mcpx.jsonrpc import Message
from mcpx.upstream.peer import ServerRequests, route_incoming


class RecordingClient:
    """A client side that records notifications and holds each question until the test answers it."""

    agent = "agent-1"

    def __init__(self) -> None:
        self.notified: list[Message] = []
        self.asked: list[tuple[str, dict[str, Any] | None]] = []
        self.answers: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.withdrawn = asyncio.Event()
        self.asking = asyncio.Event()

    async def wait_asked(self) -> None:
        async with asyncio.timeout(5):
            await self.asking.wait()

    def notify(self, message: Message) -> None:
        self.notified.append(message)

    async def ask(self, method: str, params: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
        self.asked.append((method, params))
        self.asking.set()
        try:
            return await self.answers.get()
        except asyncio.CancelledError:
            self.withdrawn.set()
            raise


class Replies:
    def __init__(self) -> None:
        self.sent: asyncio.Queue[Message] = asyncio.Queue()

    async def __call__(self, data: bytes) -> None:
        await self.sent.put(jsonrpc.loads(data))

    async def next(self) -> Message:
        async with asyncio.timeout(5):
            return await self.sent.get()


def request(request_id: int, method: str, params: dict[str, Any] | None = None) -> Message:
    return jsonrpc.request(request_id, method, params)


async def test_a_question_is_asked_and_its_answer_sent_back_under_the_servers_id() -> None:
    replies, client = Replies(), RecordingClient()
    requests = ServerRequests("alpha", replies, timeout=5)
    route_incoming(
        request(7, "sampling/createMessage", {"maxTokens": 3}), related=client, default=client, requests=requests
    )
    await client.answers.put({"result": {"role": "assistant"}})
    assert await replies.next() == {"jsonrpc": "2.0", "id": 7, "result": {"role": "assistant"}}
    assert client.asked == [("sampling/createMessage", {"maxTokens": 3})]


async def test_ping_is_answered_by_mcpx_and_roots_are_remembered() -> None:
    replies, client = Replies(), RecordingClient()
    requests = ServerRequests("alpha", replies, timeout=5)
    route_incoming(request(1, "ping"), related=None, default=client, requests=requests)
    assert await replies.next() == {"jsonrpc": "2.0", "id": 1, "result": {}}
    asked_roots = [requests.asked_roots]
    route_incoming(request(2, "roots/list"), related=None, default=client, requests=requests)
    asked_roots.append(requests.asked_roots)
    assert asked_roots == [False, True]
    await client.wait_asked()
    assert [method for method, _ in client.asked] == ["roots/list"]  # ping never reached the client
    requests.close()


async def test_the_servers_cancel_withdraws_its_question_and_nothing_is_sent_back() -> None:
    replies, client = Replies(), RecordingClient()
    requests = ServerRequests("alpha", replies, timeout=5)
    route_incoming(
        request(3, "elicitation/create", {"message": "?"}), related=client, default=client, requests=requests
    )
    await client.wait_asked()
    cancel = jsonrpc.notification("notifications/cancelled", {"requestId": 3, "reason": "no longer needed"})
    route_incoming(cancel, related=client, default=client, requests=requests)
    async with asyncio.timeout(5):
        await client.withdrawn.wait()
    assert client.notified == []  # the cancel was ours to act on, not forwarded as is
    assert replies.sent.empty()


async def test_a_cancel_of_an_unknown_request_is_passed_to_the_client() -> None:
    client = RecordingClient()
    requests = ServerRequests("alpha", Replies(), timeout=5)
    cancel = jsonrpc.notification("notifications/cancelled", {"requestId": 99})
    route_incoming(cancel, related=None, default=client, requests=requests)
    assert client.notified == [cancel]


async def test_questions_under_an_ended_call_are_withdrawn() -> None:
    client = RecordingClient()
    requests = ServerRequests("alpha", Replies(), timeout=5)
    route_incoming(request(4, "roots/list"), related=client, default=client, requests=requests, call=41)
    await client.wait_asked()
    requests.withdraw(41)
    async with asyncio.timeout(5):
        await client.withdrawn.wait()


async def test_too_many_open_questions_get_an_error_at_once() -> None:
    replies, client = Replies(), RecordingClient()
    requests = ServerRequests("alpha", replies, timeout=5)
    for request_id in range(64):
        route_incoming(request(request_id, "roots/list"), related=None, default=client, requests=requests)
    route_incoming(request(64, "roots/list"), related=None, default=client, requests=requests)
    reply = await replies.next()
    assert reply["id"] == 64 and reply["error"]["code"] == -32600
    requests.close()


async def test_a_flood_of_pings_gets_a_bounded_number_of_answers_in_flight() -> None:
    # Each answer is a POST (maybe on a connection of its own): a server sending pings faster than they are
    # answered must not make mcpx open connections and tasks without bound.
    release = asyncio.Event()
    sent: list[bytes] = []
    changed = asyncio.Condition()

    async def slow_reply(data: bytes) -> None:
        async with changed:
            sent.append(data)
            changed.notify_all()
        await release.wait()

    requests = ServerRequests("alpha", slow_reply, timeout=5)
    client = RecordingClient()
    for request_id in range(1000):
        route_incoming(request(request_id, "ping"), related=None, default=client, requests=requests)
    async with asyncio.timeout(5), changed:
        await changed.wait_for(lambda: len(sent) == 64)
    assert len(requests._answering) == 64
    release.set()
    await asyncio.wait(list(requests._answering), timeout=5)
    assert not requests._answering and len(sent) == 64
    route_incoming(request(1000, "ping"), related=None, default=client, requests=requests)  # room again
    async with asyncio.timeout(5), changed:
        await changed.wait_for(lambda: len(sent) == 65)
    requests.close()
