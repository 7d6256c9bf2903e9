"""Server-sent events for generation: text deltas as tokens are chosen.

After each step the scheduler hands a streaming request the text its new
tokens completed (`Request.on_text`, from its thread): text that later tokens
can neither change (a partial UTF-8 character) nor cut (the start of a stop
string). The last event completes the text from the final result, so the
deltas always add up to exactly the non-streamed answer.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

from prompt_store.errors import PtserveError
from server.api.waiting import POLL_S, ClientWait
from server.engine.request import GenerateResult, Request


def sse(payload) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


async def stream_generation(
    request,
    engine,
    work: Request,
    delta_event: Callable[[str], object],
    final_events: Callable[[str, GenerateResult], list],
    error_event: Callable[[str], object] = lambda detail: {"error": detail},
) -> AsyncIterator[bytes]:
    """Submit `work` and yield SSE bytes: delta_event(text) per new piece of text,
    then final_events(rest, result), or error_event(detail) once the 200 is sent
    and the work fails or times out. Abandons the work if the client leaves."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()
    work.on_text = lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece)
    future = asyncio.wrap_future(engine.inference.submit(work))  # a full queue raises here, before the stream starts
    wait = ClientWait(request, work, future, engine.settings.request_timeout_s)

    async def events():
        sent = ""
        getter = None
        try:
            while not future.done():
                getter = asyncio.ensure_future(pieces.get())
                done, _ = await asyncio.wait({getter, future}, timeout=POLL_S, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    piece = getter.result()
                    while not pieces.empty():  # behind: send what has come as one event
                        piece += pieces.get_nowait()
                    yield sse(delta_event(piece))
                    sent += piece
                else:
                    getter.cancel()
                stop = None if future.done() else await wait.reason_to_stop()
                if stop is not None:
                    wait.abandon()
                    yield sse(error_event(str(stop)))  # read by nobody if the client left
                    return
            try:
                result = future.result()
            except Exception as e:  # the 200 is already sent: the error goes in the stream
                detail = str(e) if isinstance(e, PtserveError) else f"internal error ({type(e).__name__}): {e}"
                yield sse(error_event(detail))
                return
            rest = result.text[len(sent) :] if result.text.startswith(sent) else ""
            for event in final_events(rest, result):
                yield sse(event)
        finally:  # also when the response is cancelled: stop the work, leave no task behind
            if getter is not None:
                getter.cancel()
            if not future.done():
                wait.abandon()
                future.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody reads it

    return events()
