"""Server-sent events for generation: text deltas as tokens are chosen.

A streamed request's records carry the text its tokens settled (text that later
tokens can neither change, a partial UTF-8 character, nor cut, the start of a
stop string); its last record carries the rest, so the deltas always add up to
exactly the non-streamed answer. When the client goes away, the response is
cancelled, which closes the record stream and aborts the request.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

from ptcore.errors import PtserveError
from server.engine.outputs import Output
from server.engine.request import GenerateResult


def sse(payload) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


def error_detail(error: Exception) -> str:
    return str(error) if isinstance(error, PtserveError) else f"internal error ({type(error).__name__}): {error}"


async def sse_events(
    records: AsyncIterator[Output],
    delta_event: Callable[[str], object],
    final_events: Callable[[str, GenerateResult], list],
    error_event: Callable[[str], object] = lambda detail: {"error": detail},
) -> AsyncIterator[bytes]:
    """SSE bytes: delta_event(text) per piece of text, then final_events(rest,
    result); or error_event(detail) once the 200 is sent and the request fails
    or its deadline passes."""
    async with aclosing(records):
        try:
            async for out in records:
                if out.error is not None:
                    yield sse(error_event(error_detail(out.error)))
                    return
                if out.finished:
                    for event in final_events(out.text, out.result):
                        yield sse(event)
                    return
                yield sse(delta_event(out.text))
        except PtserveError as e:  # the deadline: the 200 is already sent, the error goes in the stream
            yield sse(error_event(error_detail(e)))
