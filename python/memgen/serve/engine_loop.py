"""One engine loop for every connection: a background thread that owns the
engine (`LLM.engine`) and steps it while any request is unfinished.

Continuous batching: the HTTP side only queues requests and aborts (under a
lock) and wakes the thread; before every step the thread admits what arrived
(`LLMEngine.add_request`) and takes out what was aborted (`LLMEngine.abort`,
which frees the blocks at once), so new requests join the next step. The step's
outputs (`EngineOutput`s) go into one `OutputBuilder`, as in `LLM.generate`; then
each request's news (new token ids, logprobs, augmentation entries; the final
`CompletionOutput` of a finished choice) goes to its asyncio queue in one
`call_soon_threadsafe` per event loop. Idle, the thread waits on a condition:
no busy spin. Only this thread touches the engine.

Commands (`call`): a function run on this thread between two steps, its result or
exception handed to the caller's event loop: live MemGen checkpoint changes
(`LLM.load_memgen` / `update_memgen` / `unload_memgen`) and pause / resume. While
paused no step starts and arrived requests wait unadmitted (so a checkpoint updated
during the pause is the one they run); aborts and commands still run.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import traceback
from collections import defaultdict
from dataclasses import dataclass, field

from memgen.outputs import CompletionOutput, OutputBuilder
from memgen.sampling_params import SamplingParams
from memgen.serve.errors import APIError, internal, overloaded, shutting_down
from memgen.serve.metrics import ServeMetrics

log = logging.getLogger(__name__)


@dataclass
class ChoiceUpdate:
    """News about one choice since its last update."""
    index: int                                   # choice index: prompt_index * n + completion index
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    augmentation: list[int]
    output: CompletionOutput | None = None       # set once, when the choice ends


@dataclass
class Update:
    choices: list[ChoiceUpdate] = field(default_factory=list)
    error: APIError | None = None
    done: bool = False                           # the request has ended (all choices, or an error)


class RequestHandle:
    """One API request (one or more prompts, n choices each) as the HTTP side sees it."""

    def __init__(self, owner: EngineLoop, prompts: list[list[int]], params: SamplingParams, stream: bool):
        self.owner = owner
        self.prompts = prompts
        self.params = params
        self.stream = stream            # False: only the final outputs are sent
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Update] = asyncio.Queue()
        self.num_choices = len(prompts) * params.n
        self.finished = False           # set on the event loop when the last update arrives
        # owned by the engine thread
        self._rids: list[int] = []      # engine request ids, one per choice
        self._sent: list[int] = []
        self._done: list[bool] = []
        self._aborted = False

    def abort(self) -> None:
        """The client went away: stop generating and free the blocks (no-op once finished)."""
        if not self.finished:
            self.owner.abort(self)

    async def updates(self):
        """The updates until the request ends; raises the APIError of a failed request."""
        while True:
            update = await self.queue.get()
            if update.error is not None:
                self.finished = True
                raise update.error
            if update.done:
                self.finished = True
            yield update
            if update.done:
                return


class EngineLoop:
    def __init__(self, llm, metrics: ServeMetrics | None = None, max_waiting: int | None = None):
        self.llm = llm
        self.engine = llm.engine
        self.builder = OutputBuilder(llm.tokenizer)    # used by the engine thread only
        self.metrics = metrics if metrics is not None else ServeMetrics()
        self.max_waiting = max_waiting
        self._cv = threading.Condition()
        self._pending: list[RequestHandle] = []
        self._pending_seqs = 0
        self._aborts: list[RequestHandle] = []
        self._active: list[RequestHandle] = []
        self._stopping = False
        self._engine_waiting = 0
        self._num_preemptions = 0
        self._thread: threading.Thread | None = None
        self.error: str | None = None   # set if the loop itself died (the server is then unhealthy)
        self._commands: list[tuple] = []
        self.paused = False             # set by commands on this thread (and by unpause, under the lock)
        self._rid_checkpoint: dict[int, str] = {}   # engine request id -> its MemGen checkpoint's name
        # the loaded MemGen checkpoints, name -> version: replaced (never changed) by this thread after
        # every change, read by the HTTP side
        self.checkpoints: dict[str, int] = dict(llm.memgen_checkpoints()) if llm.memgen is not None else {}

    # ---- the HTTP side -----------------------------------------------------------------
    def start(self) -> None:
        self.metrics.set_checkpoints(self.checkpoints)
        self._publish_state()
        self._thread = threading.Thread(target=self._run, name="memgen-engine-loop", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    @property
    def num_waiting(self) -> int:
        """Sequences not yet admitted: queued here, or in the engine's waiting queue."""
        return self._pending_seqs + self._engine_waiting

    def submit(self, prompts: list[list[int]], params: SamplingParams, stream: bool) -> RequestHandle:
        """Queue a validated request (one handle for its prompts x n choices). Raises
        the 503 APIError when --max-waiting sequences are already waiting."""
        if self._stopping and self.error is None:
            raise shutting_down()
        if self.error is not None or self._stopping:
            raise internal(f"the engine loop is not running{f': {self.error}' if self.error else ''}")
        handle = RequestHandle(self, prompts, params, stream)
        with self._cv:
            waiting = self.num_waiting
            if self.max_waiting is not None and waiting >= self.max_waiting:
                raise overloaded(waiting, self.max_waiting)
            self._pending.append(handle)
            self._pending_seqs += handle.num_choices
            self.metrics.waiting.set(self.num_waiting)    # (also while paused: no step publishes it then)
            self._cv.notify()
        return handle

    def abort(self, handle: RequestHandle) -> None:
        with self._cv:
            self._aborts.append(handle)
            self._cv.notify()

    def call(self, fn) -> asyncio.Future:
        """Run `fn()` on the engine thread between steps; await the returned future for
        its result (or its exception)."""
        if self.error is not None or self._stopping:
            raise internal(f"the engine loop is not running{f': {self.error}' if self.error else ''}")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._cv:
            self._commands.append((fn, future, loop))
            self._cv.notify()
        return future

    def unpause(self) -> None:
        """Resume at once, from any thread (a SIGTERM drain: requests in flight must finish)."""
        with self._cv:
            self.paused = False
            self.metrics.paused.set(0)
            self._cv.notify()

    # ---- the engine thread -------------------------------------------------------------
    def _run(self) -> None:
        try:
            device = getattr(self.llm, "device", None)
            if device is not None and device.type == "cuda":
                import torch

                torch.cuda.set_device(device)   # the current device is per thread
            while True:
                with self._cv:
                    while not self._has_work():
                        self._cv.wait()
                    if self._stopping:
                        break
                    commands, self._commands = self._commands, []
                    aborts, self._aborts = self._aborts, []
                self._run_commands(commands)
                with self._cv:
                    pending = []
                    if not self.paused:     # paused: arrived requests wait unadmitted
                        pending, self._pending, self._pending_seqs = self._pending, [], 0
                self._iterate(pending, aborts)
        except BaseException as e:  # the loop itself broke: fail everything, report unhealthy
            self.error = f"{type(e).__name__}: {e}"
            log.error("memgen engine loop died:\n%s", traceback.format_exc())
        finally:
            with self._cv:
                leftover, self._pending = self._pending + self._active, []
                self._active = []
                commands, self._commands = self._commands, []
            self._deliver([(h, Update(error=shutting_down(), done=True)) for h in leftover])
            for _, future, loop in commands:
                _resolve(loop, future, None, shutting_down())

    def _has_work(self) -> bool:
        return bool(self._aborts or self._commands or self._stopping or
                    (not self.paused and (self._pending or self.engine.has_unfinished())))

    def _run_commands(self, commands) -> None:
        for fn, future, loop in commands:
            try:
                result, error = fn(), None
            except Exception as e:   # the caller's to answer (a bad checkpoint: 400), the loop goes on
                result, error = None, e
            # published before the caller hears back: its next request sees the change
            if self.llm.memgen is not None:
                self.checkpoints = dict(self.llm.memgen_checkpoints())
                self.metrics.set_checkpoints(self.checkpoints)
            self.metrics.paused.set(int(self.paused))
            _resolve(loop, future, result, error)

    def _iterate(self, pending: list[RequestHandle], aborts: list[RequestHandle]) -> None:
        for handle in aborts:
            self._abort(handle)
        deliveries = []
        for handle in pending:
            if handle._aborted:
                continue
            try:
                self._add(handle)
            except APIError as e:   # its checkpoint was unloaded since the request was checked
                self._abort(handle)
                deliveries.append((handle, Update(error=e, done=True)))
            except Exception as e:  # validated input should never fail here: an internal error
                log.error("add_request failed:\n%s", traceback.format_exc())
                self._abort(handle, "error")
                deliveries.append((handle, Update(error=internal(f"could not queue the request: {e}"), done=True)))
        if self.engine.has_unfinished() and not self.paused:
            try:
                outputs = self.engine.step()
                self.builder.update(outputs)
                self.metrics.generation_tokens.inc(sum(len(o.new_token_ids) for o in outputs))
                if self._rid_checkpoint:
                    self.metrics.checkpoint_tokens(self._rid_checkpoint, outputs)
            except Exception as e:
                # an internal error (never a user's: input was validated): the step's requests fail
                # with a 500, their blocks are freed, and the loop serves the next ones
                log.error("engine step failed:\n%s", traceback.format_exc())
                failed = list(self._active)
                for handle in failed:
                    self._abort(handle, "error")
                deliveries += [(h, Update(error=internal(f"the engine failed: {type(e).__name__}: {e}"), done=True))
                               for h in failed]
        deliveries += self._collect()
        self._deliver(deliveries)
        self._publish_state()

    def _add(self, handle: RequestHandle) -> None:
        params = handle.params
        checkpoint = None
        if self.llm.memgen is not None:
            try:
                checkpoint = self.llm.memgen.get(params.memgen_checkpoint).name
            except ValueError:
                raise APIError(404, f"the MemGen checkpoint `{params.memgen_checkpoint or '(default)'}` was "
                                    "unloaded before this request started", "invalid_request_error", "model",
                               "model_not_found") from None
        for ids in handle.prompts:
            for i in range(params.n):
                rid = self.engine.add_request(ids, params.for_completion(i))
                handle._rids.append(self.builder.add(rid, ids, params, i))
                self.metrics.prompt_tokens.inc(len(ids))
                if checkpoint is not None:
                    self._rid_checkpoint[rid] = checkpoint
                    self.metrics.checkpoint_prompt_tokens.labels(checkpoint).inc(len(ids))
        handle._sent = [0] * len(handle._rids)
        handle._done = [False] * len(handle._rids)
        self._active.append(handle)

    def _abort(self, handle: RequestHandle, reason: str = "abort") -> None:
        """Take a request's unfinished sequences out of the engine (their blocks are
        freed now); `reason` labels them in the metrics ("error" when the engine failed)."""
        if handle._aborted:
            return
        handle._aborted = True
        live = [rid for rid, done in zip(handle._rids, handle._done) if not done]
        if live:
            for out in self.engine.abort(live):
                self.metrics.record_request(out.metrics, len(self.builder.token_ids(out.request_id)), reason)
        self.builder.forget(handle._rids)
        for rid in handle._rids:
            self._rid_checkpoint.pop(rid, None)
        if handle in self._active:
            self._active.remove(handle)

    def _collect(self) -> list[tuple[RequestHandle, Update]]:
        """Each active request's news since the last step."""
        out, still = [], []
        for handle in self._active:
            update = Update()
            for j, rid in enumerate(handle._rids):
                if handle._done[j]:
                    continue
                token_ids, logprobs, augmentation = self.builder.progress(rid)
                n, sent, finished = len(token_ids), handle._sent[j], self.builder.finished(rid)
                if not finished and (n == sent or not handle.stream):
                    continue
                output = None
                if finished:
                    handle._done[j] = True
                    output = self.builder.completion(rid)
                    self.metrics.record_request(output.metrics, n, output.finish_reason)
                update.choices.append(ChoiceUpdate(
                    index=j, token_ids=token_ids[sent:n], logprobs=None if logprobs is None else logprobs[sent:n],
                    augmentation=augmentation[sent:n], output=output))
                handle._sent[j] = n
            update.done = all(handle._done)
            if update.choices:
                out.append((handle, update))
            if update.done:
                self.builder.forget(handle._rids)
                for rid in handle._rids:
                    self._rid_checkpoint.pop(rid, None)
            else:
                still.append(handle)
        self._active = still
        return out

    def _deliver(self, deliveries: list[tuple[RequestHandle, Update]]) -> None:
        by_loop = defaultdict(list)
        for handle, update in deliveries:
            by_loop[handle.loop].append((handle.queue, update))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:   # that event loop is closed: nobody is listening
                pass

    def _publish_state(self) -> None:
        stats = self.engine.stats()
        self._engine_waiting = stats["waiting"]
        self.metrics.preemptions.inc(stats["preemptions"] - self._num_preemptions)
        self._num_preemptions = stats["preemptions"]
        self.metrics.set_engine_state(stats["running"], self.num_waiting, stats["kv_blocks"])
        if self.llm.memgen is not None:
            self.metrics.set_checkpoint_running(self._rid_checkpoint)


def _resolve(loop, future, result, error) -> None:
    def settle():
        if future.done():       # the caller gave up (its client went away)
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:        # that event loop is closed
        pass


def _put_all(items) -> None:
    for queue, update in items:
        queue.put_nowait(update)

