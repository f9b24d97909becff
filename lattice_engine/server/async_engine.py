"""`AsyncEngine`: a `BatchRunner` stepped by one background thread, with asyncio streams.

The model runs in its own thread so the event loop stays free for HTTP while a forward
is under way (the C kernels release the GIL). Requests and aborts from the event loop go
through a queue that the thread drains between steps, so the runner is only ever touched
by one thread; outputs come back to each request's asyncio.Queue with
`call_soon_threadsafe`. An abort (a client that went away) frees the request's KV blocks
right after the step in flight. `close_streams` (the server shutting down) ends every
request at once: each stream gets `EngineClosed`, and new ones are refused.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import AsyncIterator, Optional, Sequence

from ..batching import DEFAULT_SPECULATION, BatchRunner, RequestOutput
from ..sampling import SamplingParams

log = logging.getLogger(__name__)


class EngineClosed(RuntimeError):
    """The engine stopped taking work (the server is shutting down); the request was
    ended where it was."""


class EngineFailed(RuntimeError):
    """A batched forward raised (a bug, logged with its traceback): the requests in it were
    ended. The message names the request id only, never the internal exception."""

    def __init__(self, request_id: str):
        super().__init__(f"internal error in the batched forward; the server log has the "
                         f"details under request id {request_id}")


class AsyncEngine:
    """`runner` is None for an embedding-only model: the thread then runs only `call`s."""

    def __init__(self, runner: Optional[BatchRunner]):
        self.runner = runner
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = False
        self._closing: Optional[str] = None
        self._thread = threading.Thread(target=self._loop, name="lattice-engine", daemon=True)
        self._thread.start()
        self.error: Optional[BaseException] = None

    # ---- event-loop side ---------------------------------------------------------------
    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams, *,
                       request_id: Optional[str] = None, logits_mask=None,
                       ignore_eos: bool = False, images=None, encoder=None,
                       speculation=DEFAULT_SPECULATION) -> AsyncIterator[RequestOutput]:
        """Validate and queue a request, then yield its outputs as steps produce them.
        Raises RequestError before yielding anything if the request is invalid. Closing
        the iterator early (a client that disconnected) aborts the request."""
        return self.submit(self.prepare(prompt_ids, params, request_id=request_id,
                                        logits_mask=logits_mask, ignore_eos=ignore_eos,
                                        images=images, encoder=encoder,
                                        speculation=speculation))

    def prepare(self, prompt_ids: Sequence[int], params: SamplingParams, *,
                request_id: Optional[str] = None, logits_mask=None, ignore_eos: bool = False,
                prefix_leader=None, images=None, encoder=None,
                speculation=DEFAULT_SPECULATION, adapter=None):
        """Validate a request and build its sequence (RequestError if it is invalid);
        `submit` queues it. prefix_leader: a prepared sequence with the same prompt,
        submitted first, whose prompt blocks this one reuses (n > 1). images / encoder: the
        `multimodal.MultimodalPrompt` behind prompt_ids and its `LoadedInputEncoder`;
        speculation: the request's choice (`protocol.speculation_from`), the runner's
        default if unset; adapter: see `BatchRunner.make_sequence` (released here if the
        request is refused)."""
        try:
            return self.runner.make_sequence(prompt_ids, params, request_id=request_id,
                                             logits_mask=logits_mask, ignore_eos=ignore_eos,
                                             prefix_leader=prefix_leader, images=images,
                                             encoder=encoder, speculation=speculation,
                                             adapter=adapter)
        except BaseException:
            if adapter is not None:
                adapter[2]()
            raise

    def submit(self, seq) -> AsyncIterator[RequestOutput]:
        """Queue a prepared sequence (when the stream is first iterated) and yield its
        outputs; closing the stream early aborts it."""
        return self._stream(seq)

    async def _stream(self, seq) -> AsyncIterator[RequestOutput]:
        q: asyncio.Queue = asyncio.Queue()
        self._streams[seq.request_id] = (asyncio.get_running_loop(), q)
        self._send(("add", seq))
        finished = False
        try:
            while True:
                out = await q.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self._streams.pop(seq.request_id, None)
            if not finished:
                self._send(("abort", seq.request_id))

    async def call(self, fn):
        """Run fn() on the engine thread, between steps, and return its result (or raise
        its exception): the model and the kernel pool are only ever driven by that thread.
        Embedding requests go through here."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._send(("call", (fn, loop, future)))
        return await future

    def num_streams(self) -> int:
        """Requests queued or running on behalf of a listener (the concurrency count)."""
        return len(self._streams)

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def close_streams(self, reason: str) -> None:
        """End every request now and refuse new ones: their streams raise EngineClosed
        (reason); their KV blocks are freed after the step in flight. Safe to call from a
        signal handler (it only queues a command)."""
        self._send(("close", reason))

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)

    def _send(self, command) -> None:
        self._commands.put(command)
        self._wake.set()

    # ---- engine thread -------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop:
            self._drain()
            if self.runner is None or not self.runner.has_unfinished():
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                outputs = self.runner.step()
            except Exception as exc:  # a bug: fail the running requests, keep serving
                log.exception("engine step failed")
                self.error = exc
                self._fail_all(exc)
                continue
            # /health reports the engine as it is now: degraded while steps fail, ok again
            # once one succeeds (it used to stay degraded for good after one failure)
            self.error = None
            for out in outputs:
                self._deliver(out.request_id, out)

    def _drain(self) -> None:
        while True:
            try:
                kind, arg = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "call":
                self._run_call(*arg)
            elif kind == "add":
                if self._closing is not None:
                    self._deliver(arg.request_id, EngineClosed(self._closing))
                    continue
                try:
                    self.runner.enqueue(arg)
                except Exception as exc:
                    self._deliver(arg.request_id, exc)
            elif kind == "close":
                self._closing = arg
                if self.runner is None:
                    continue
                for seq in self.runner.pending():
                    self.runner.abort(seq.request_id)
                    self._deliver(seq.request_id, EngineClosed(arg))
            elif self.runner is not None:
                self.runner.abort(arg)

    def _run_call(self, fn, loop, future) -> None:
        if self._closing is not None:
            outcome, ok = EngineClosed(self._closing), False
        else:
            try:
                outcome, ok = fn(), True
            except Exception as exc:  # the caller turns it into its response
                outcome, ok = exc, False

        def settle():
            if future.done():  # the request went away meanwhile
                return
            if ok:
                future.set_result(outcome)
            else:
                future.set_exception(outcome)
        try:
            loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop is closed
            pass

    def _deliver(self, request_id: str, item) -> None:
        target = self._streams.get(request_id)
        if target is None:
            return
        loop, q = target
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def _fail_all(self, exc: BaseException) -> None:
        # the exception's text is for the log (written above), not for clients
        if self.runner is None:
            return
        for seq in self.runner.pending():
            self.runner.abort(seq.request_id)
            self._deliver(seq.request_id, EngineFailed(seq.request_id))
