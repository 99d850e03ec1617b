"""HEAD wherever GET is routed (RFC 9110: a server answers HEAD as it would GET, without the
body): litestar routes only the methods a handler declares, and answered HEAD /healthz 405."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from litestar.types import Message, Receive, Scope, Send


async def answer_head(
    app: Callable[[Scope, Receive, Send], Awaitable[None]],
    scope: Scope,
    receive: Receive,
    send: Send,
) -> None:
    """The GET answer's status and headers (its Content-Length included), no body. A
    streamed answer's later chunks are dropped, as a GET's would cost the same."""
    ended = False

    async def headless(message: Message) -> None:
        nonlocal ended
        if message["type"] != "http.response.body":
            await send(message)
        elif not ended:
            ended = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    await app({**scope, "method": "GET"}, receive, headless)  # type: ignore[typeddict-item]
