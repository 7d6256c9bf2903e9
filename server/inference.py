"""Inference, the one way in for every inference route: `generate` and
`classify` prepare a request, submit it, and give back its Output records as an
async stream.

Preparing blocks (a store read, tokenizing), so it runs in a worker thread
(server/input_lanes.py). Submitting only queues. The records come back through
the output channel (server/output_router.py). The stream ends with the record
that holds the answer; when its reader stops early (the client went away, the
route was cancelled) or the request's deadline passes, the request is aborted.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator

from prompt_store.template import own_length
from ptcore.errors import DeadlineExceeded, InvalidRequest
from ptcore.model import LoadedModel
from ptcore.task_prompt import TaskPrompt, check_classify_input
from server.engine.outputs import Output
from server.engine.request import SAMPLING_KEYS, Request, SamplingParams
from server.engine.scheduler import Scheduler
from server.handwritten import HandWritten, handwritten_prompt
from server.input_lanes import InputLanes, input_chars, long_input
from server.output_router import OutputRouter
from server.prompt_cache import PromptCache
from server.settings import Settings
from server.tokenizer_process import TokenizerProcess

# No tokenizer we serve packs more than this many characters into one token of
# ordinary text (English averages about 4), so input longer than
# max_input_tokens * CHARS_PER_TOKEN_BOUND cannot fit and is refused before
# tokenizing, which would cost far more than the refusal.
CHARS_PER_TOKEN_BOUND = 16

TaskOrHand = str | HandWritten  # what a request runs: a stored task, by id, or a hand-written prompt


def chars_of(task_id: TaskOrHand, fields: dict[str, str]) -> int:
    """A request's size before tokenizing: its fields' characters, and a hand-written prompt's."""
    return input_chars(fields) + (len(task_id.template) if isinstance(task_id, HandWritten) else 0)


class Inference:
    def __init__(
        self,
        settings: Settings,
        loaded: LoadedModel,
        prompts: PromptCache,
        scheduler: Scheduler,
        position_limit: int | None,
    ):
        """position_limit: input + new tokens of one generate request, at most
        (None: unbounded); the scheduler's, from server/build.py."""
        self.settings = settings
        self.loaded = loaded
        self.prompts = prompts
        self.scheduler = scheduler
        self.position_limit = position_limit
        self.lanes = InputLanes(settings.request_timeout_s)
        # the long lane's: a process of its own at the lowest CPU priority (server/tokenizer_process.py)
        self.long_tokenizer = TokenizerProcess(loaded.tokenizer, settings.request_timeout_s)
        self.router: OutputRouter | None = None  # from start(), on the event loop
        self.preparing = 0  # requests in a lane now (on the event loop: no lock)

    def close(self) -> None:
        self.long_tokenizer.close()

    def start(self) -> None:
        """On the event loop: open the output channel and start the scheduler's thread."""
        self.router = OutputRouter(asyncio.get_running_loop())
        self.scheduler.start(self.router)

    async def generate(self, task_id: TaskOrHand, fields: dict[str, str], overrides: dict,
                       stream: bool = False, version: int | None = None) -> AsyncIterator[Output]:  # fmt: skip
        """Prepare and submit a generate request (refusals raise here, before any
        record); -> its records: with `stream`, one per piece of settled text, and
        always a last one holding the GenerateResult or the error. `version`: a
        kept version of the task to run instead of the latest."""
        return await self._submit(self.prepare_generate, chars_of(task_id, fields), task_id, fields, overrides, stream,
                                  version)  # fmt: skip

    async def classify(self, task_id: TaskOrHand, fields: dict[str, str],
                       version: int | None = None) -> AsyncIterator[Output]:  # fmt: skip
        """Prepare and submit a classify request; -> its one record (ClassifyResult or error)."""
        return await self._submit(self.prepare_classify, chars_of(task_id, fields), task_id, fields, version)

    async def _submit(self, prepare_fn, chars: int, *args) -> AsyncIterator[Output]:
        """Prepare (in a lane) and submit one request; counted in `preparing` until its channel is open."""
        self.preparing += 1
        try:
            return self._records(await self.lanes.prepare(prepare_fn, chars, *args))
        finally:
            self.preparing -= 1

    def busy(self) -> bool:
        """Whether a request is being prepared, or submitted and not yet read to its end (on the event loop)."""
        return self.preparing > 0 or (self.router is not None and self.router.listening() > 0)

    def _records(self, work: Request) -> AsyncIterator[Output]:
        request_id = self.scheduler.submit(work)  # a full queue raises here
        # opened before this coroutine next yields to the loop: no record can be delivered earlier
        records = self._read(request_id, self.router.open(request_id))
        # a stream dropped before its first read (a response cancelled before it began)
        # runs no `finally`: when it is collected, its request is aborted all the same
        weakref.finalize(records, self._drop_unread, request_id)
        return records

    def _drop_unread(self, request_id: int) -> None:
        if self.router.is_open(request_id):  # _read closes it whenever it ran
            self.router.close(request_id)
            self.scheduler.abort(request_id)

    async def _read(self, request_id: int, queue: asyncio.Queue[Output]) -> AsyncIterator[Output]:
        timeout = self.settings.request_timeout_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        late = f"the request did not finish within {timeout:g} s"
        finished = False
        try:
            while not finished:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise DeadlineExceeded(late)
                if queue.empty():  # wait_for makes a task: only when there is something to wait for
                    try:
                        out = await asyncio.wait_for(queue.get(), remaining)
                    except asyncio.TimeoutError:
                        raise DeadlineExceeded(late) from None
                else:
                    out = queue.get_nowait()
                finished = out.finished
                yield out
        finally:  # the last record, a reader that stopped early, or the deadline
            self.router.close(request_id)
            if not finished:
                self.scheduler.abort(request_id)

    def resolve(self, task_id: TaskOrHand, task_type: str, fields: dict[str, str],
                version: int | None = None) -> tuple[TaskPrompt, list[int]]:  # fmt: skip
        """The task's prompt (its latest version, or `version`; or a hand-written
        one's) and the rendered input ids, within the input limits."""
        chars, limit = chars_of(task_id, fields), self.settings.max_input_tokens
        if chars > limit * CHARS_PER_TOKEN_BOUND:  # before anything is tokenized
            raise InvalidRequest(
                f"input is {chars} characters; the limit is {limit * CHARS_PER_TOKEN_BOUND} "
                f"({CHARS_PER_TOKEN_BOUND} characters per token of the {limit}-token input limit), "
                "checked before tokenizing"
            )
        if isinstance(task_id, HandWritten):
            limits = self.settings.max_labels, self.settings.max_virtual_tokens
            prompt = handwritten_prompt(task_id, self.loaded, *limits)
        else:
            prompt = self.prompts.get(task_id, version)
        if prompt.task_type != task_type:
            raise InvalidRequest(f"task {task_id!r} is a {prompt.task_type} task; use its /{prompt.task_type} route")
        tokenizer = self.long_tokenizer if long_input(chars) else self.loaded.tokenizer
        ids = prompt.render(tokenizer, fields, self.loaded.vocab_size)
        if len(ids) > limit:
            raise InvalidRequest(f"rendered input is {len(ids)} tokens; the limit is {limit}")
        return prompt, ids

    def prepare_generate(
        self, task_id: TaskOrHand, fields: dict[str, str], overrides: dict, stream: bool = False,
        version: int | None = None,
    ) -> Request:  # fmt: skip
        if self.loaded.family != "causal":
            raise InvalidRequest(
                f"the served model {self.loaded.info['name_or_path']!r} is a {self.loaded.family} model, "
                "not a causal LM: it cannot generate text, only classify"
            )
        prompt, ids = self.resolve(task_id, "generate", fields, version)
        params = self.sampling_params(prompt.generation, overrides)
        limit = self.position_limit
        if limit is not None and len(ids) + params.max_new_tokens > limit:
            raise InvalidRequest(
                f"{len(ids)} input tokens + max_new_tokens {params.max_new_tokens} exceed the {limit} positions "
                "a request may use here"
            )
        return Request.generate(prompt, ids, params, stream)

    def prepare_classify(self, task_id: TaskOrHand, fields: dict[str, str], version: int | None = None) -> Request:
        prompt, ids = self.resolve(task_id, "classify", fields, version)
        check_classify_input(prompt, ids, self.loaded)
        return Request.classify(prompt, ids)

    def sampling_params(self, generation: dict, overrides: dict) -> SamplingParams:
        """Request values (`overrides`) win over the artifact's `generation` defaults,
        which win over the server's; None means unset."""
        chosen = {"max_new_tokens": self.settings.default_max_new_tokens}
        for source in (generation, overrides):
            chosen.update({k: v for k, v in source.items() if k in SAMPLING_KEYS and v is not None})
        stop = chosen.get("stop", ())
        if isinstance(stop, str):
            chosen["stop"] = (stop,)
        elif isinstance(stop, (list, tuple)):
            chosen["stop"] = tuple(stop)
        else:
            raise InvalidRequest(f"stop must be a string or a list of strings, got {stop!r}")
        params = SamplingParams(**chosen)
        if params.max_new_tokens > self.settings.max_new_tokens_limit:
            raise InvalidRequest(
                f"max_new_tokens {params.max_new_tokens} exceeds this server's limit of "
                f"{self.settings.max_new_tokens_limit}"
            )
        return params

    def check_generation_defaults(self, prompt: TaskPrompt) -> None:
        """A generate task's `generation` defaults must make valid parameters, and its
        max_new_tokens must leave room for the template, or every request that keeps
        the defaults would be refused (checked at upload)."""
        try:
            self.sampling_params(prompt.generation, {})
            wanted, limit = prompt.generation.get("max_new_tokens"), self.position_limit
            if wanted is None or limit is None:
                return
            fixed = own_length(prompt.template, self.loaded.tokenizer, self.loaded.vocab_size)
            if fixed + wanted > limit:
                raise InvalidRequest(
                    f"max_new_tokens {wanted} plus the template's own {fixed} tokens exceed the {limit} positions "
                    "a request may use here"
                )
        except InvalidRequest as e:
            raise InvalidRequest(f"bad 'generation' defaults in the artifact: {e}") from None
