"""A non-streamed answer: an inference stream read to its last record.

The client may go away meanwhile. Its disconnect arrives as an ASGI message
(`http.disconnect`, once the body has been read): waiting for that message
beside the stream, with no polling, closes the stream when it comes, which
aborts the request (its queued entry or its running row, freeing the slot).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing, suppress

from fastapi import Request

from ptcore.errors import Abandoned
from server.engine.outputs import Output


async def last_record(records: AsyncIterator[Output]) -> Output:
    """Read `records` to its last one; closing it whatever happens."""
    async with aclosing(records):
        async for out in records:
            if out.finished:
                return out
    raise RuntimeError("an inference stream ended without its last record")


async def client_gone(request: Request) -> None:
    """Returns when the client has disconnected."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def result_of(request: Request, records: AsyncIterator[Output]):
    """The answer its last record holds (its error is raised); Abandoned if the
    client goes away first."""
    reading = asyncio.ensure_future(last_record(records))
    leaving = asyncio.ensure_future(client_gone(request))
    try:
        await asyncio.wait({reading, leaving}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this route is cancelled: cancelling `reading` closes the stream
        leaving.cancel()
        if not reading.done():
            reading.cancel()
            with suppress(asyncio.CancelledError):
                await reading
    if not reading.done() or reading.cancelled():
        raise Abandoned("the client went away")
    out = reading.result()
    if out.error is not None:
        raise out.error
    return out.result
