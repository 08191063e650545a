"""The engine in its own process: the HTTP server's Python work no longer shares a GIL with it.

With the engine on a thread of the server process, every streamed chunk (request parsing, SSE
encoding, socket writes) holds the GIL that the engine's scheduler, sampler and detokenizer
need, so the engine steps slower than offline. Here a child process (spawned, as vLLM's
EngineCore) owns the LLMEngine and loops: apply commands, step, send what the step added.
Each step's outputs go in one message, as deltas (new token ids, new text, finish reason:
`DeltaEncoder`), not the engine's cumulative RequestOutputs, whose pickles grow with every
token (prompt ids included) and whose writes then block on a full pipe; the server side
rebuilds the cumulative outputs (`apply_delta`). The server side is AsyncLLMEngine's event-loop half, unchanged: commands go out through a
sender thread (a full pipe never blocks the event loop); a receiver thread unpickles each
step's outputs and hands them to the loop, which fans them out to the same per-request streams.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import logging
import multiprocessing as mp
import queue
import signal
import threading
import time
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from engine.outputs import CompletionOutput, RequestOutput
from engine.server.async_engine import (
    STATS_INTERVAL_S,
    AsyncLLMEngine,
    EngineDeadError,
    _Abort,
    stats_of,
)

if TYPE_CHECKING:
    from engine.config import EngineArgs

logger = logging.getLogger(__name__)

# One choice's part of a delta: (index, new token ids, chars of the text kept, text added,
# finish reason, new logprobs or None, cumulative logprob, stop reason). The kept length is
# below the text sent so far only when the engine cut a stop string off the end.
ChoiceDelta = tuple[int, list[int], int, str, str | None, list | None, float | None, Any]
# What one step added to one request: (request id, finished, n, its changed choices).
Delta = tuple[str, bool, int, list[ChoiceDelta]]


class DeltaEncoder:
    """Engine side: turns the engine's cumulative RequestOutputs into what each step added."""

    def __init__(self) -> None:
        # request id -> choice index -> (token ids sent, text chars sent, finish sent)
        self._sent: dict[str, dict[int, tuple[int, int, bool]]] = {}

    def encode(self, outputs: list[RequestOutput]) -> list[Delta]:
        deltas = []
        for out in outputs:
            sent = self._sent.setdefault(out.request_id, {})
            parts = []
            for c in out.outputs:
                ntok, ntext, fin = sent.get(c.index, (0, 0, False))
                keep = min(ntext, len(c.text))
                ids, added, done = c.token_ids[ntok:], c.text[keep:], c.finish_reason is not None
                if not ids and not added and keep == ntext and done == fin:
                    continue  # unchanged (e.g. a sample not forked yet)
                lps = c.logprobs[ntok:] if c.logprobs is not None else None
                parts.append((c.index, ids, keep, added, c.finish_reason, lps,
                              c.cumulative_logprob, c.stop_reason))  # fmt: skip
                sent[c.index] = (len(c.token_ids), len(c.text), done)
            if out.finished:
                del self._sent[out.request_id]
            deltas.append((out.request_id, out.finished, len(out.outputs), parts))
        return deltas

    def forget(self, request_id: str) -> None:
        self._sent.pop(request_id, None)


def apply_delta(acc: RequestOutput | None, delta: Delta) -> RequestOutput:
    """Server side: add one delta to a request's cumulative output (made on its first one)."""
    request_id, finished, n, parts = delta
    if acc is None:
        acc = RequestOutput(request_id, None, [], [], False)
    outs = acc.outputs
    while len(outs) < n:
        outs.append(CompletionOutput(index=len(outs)))
    for index, ids, keep, added, reason, lps, cum, stop in parts:
        c = outs[index]
        c.token_ids.extend(ids)
        if added or keep != len(c.text):
            c.text = c.text[:keep] + added
        if lps is not None:
            if c.logprobs is None:
                c.logprobs = []
            c.logprobs.extend(lps)
        c.finish_reason, c.cumulative_logprob, c.stop_reason = reason, cum, stop
    acc.finished = finished
    return acc


class ProcessLLMEngine(AsyncLLMEngine):
    """AsyncLLMEngine whose LLMEngine runs in a child process; start with `await launch()`."""

    def __init__(self, args: EngineArgs, max_pending: int = 1024, retry_after_s: int = 1) -> None:
        super().__init__(None, max_pending, retry_after_s)  # type: ignore[arg-type]
        self.args = args
        self._proc: mp.process.BaseProcess | None = None
        self._cmd: Connection | None = None
        self._out: Connection | None = None
        self._adds: dict[str, concurrent.futures.Future[None]] = {}
        self._tokenizer: Any = None
        self._max_model_len = 0
        self._receiver: threading.Thread | None = None
        self._outputs: dict[str, RequestOutput] = {}  # cumulative, rebuilt from deltas
        self._eof = False  # the output pipe ended: the engine process is gone

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def is_running(self) -> bool:
        # Asked several times per request: the pipe's EOF (seen by the receiver thread the
        # moment the process exits) tells what Process.is_alive's waitpid would, without a
        # system call.
        return self._proc is not None and not self._eof and self.dead_error is None

    async def launch(self) -> None:
        """Spawn the engine process, load the tokenizer here meanwhile, wait until it is ready."""
        from engine.tokenizer import EngineTokenizer

        ctx = mp.get_context("spawn")
        cmd_r, self._cmd = ctx.Pipe(duplex=False)
        self._out, out_w = ctx.Pipe(duplex=False)
        # Not a daemon: the engine may start tensor-parallel workers of its own. It exits when
        # this process goes away (its command pipe reaches EOF).
        self._proc = ctx.Process(
            target=engine_main, args=(self.args, cmd_r, out_w), name="engine-core"
        )
        self._proc.start()
        cmd_r.close()
        out_w.close()
        try:
            self._tokenizer = await asyncio.to_thread(
                EngineTokenizer.from_pretrained, self.args.model
            )
            try:
                kind, info = await asyncio.to_thread(self._out.recv)
            except EOFError as e:
                raise RuntimeError("the engine process exited while loading the model") from e
            if kind != "ready":
                raise RuntimeError(info)
        except BaseException:
            self._proc.terminate()
            raise
        self._max_model_len = info["max_model_len"]
        self._loop = asyncio.get_running_loop()
        self._receiver = threading.Thread(target=self._recv_loop, name="engine-recv", daemon=True)
        self._receiver.start()
        self._thread = threading.Thread(target=self._send_loop, name="engine-send", daemon=True)
        self._thread.start()

    def start(self) -> None:
        raise RuntimeError("ProcessLLMEngine starts with `await launch()`")

    # ---- sender thread: commands to the engine process ----------------------------------------

    def _send_loop(self) -> None:
        """Send what the inbox holds as one message: requests that arrive together (a burst)
        cost the engine process one read, and this side one reply, not one each."""
        assert self._cmd is not None
        try:
            while True:
                cmds = [self._inbox.get()]
                with contextlib.suppress(queue.Empty):
                    while cmds[-1] is not None:
                        cmds.append(self._inbox.get_nowait())
                batch: list[tuple[Any, ...]] = []
                for cmd in cmds:
                    if isinstance(cmd, _Abort):
                        batch.append(("abort", cmd.request_id))
                    elif cmd is not None and cmd.done.set_running_or_notify_cancel():
                        self._adds[cmd.request_id] = cmd.done
                        batch.append(
                            ("add", cmd.request_id, cmd.prompt, cmd.params, cmd.arrival_time)
                        )
                if batch:
                    self._cmd.send(batch)
                if cmds[-1] is None:
                    self._cmd.send(None)
                    return
        except (OSError, EOFError) as e:  # the engine process is gone; the reader reports it
            logger.debug("engine command pipe closed: %r", e)

    # ---- receiver thread: outputs from the engine process, handed to the event loop -----------
    # (Not loop.add_reader: uvloop makes the pipe non-blocking and a large message then fails
    # half-read. Unpickling here also keeps that work off the event loop.)

    def _recv_loop(self) -> None:
        assert self._out is not None and self._loop is not None
        try:
            while True:
                self._loop.call_soon_threadsafe(self._on_message, self._out.recv())
        except (EOFError, OSError) as e:
            self._eof = True
            error = EngineDeadError(f"the engine process exited ({e!r})")
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                self._loop.call_soon_threadsafe(self._died, error)

    def _on_message(self, msg: tuple[Any, ...]) -> None:
        if msg[0] == "out":
            self._dispatch(self._apply(msg[1]))
            if msg[2] is not None:
                self._set_stats(*msg[2])
        elif msg[0] == "added":
            for request_id, error in msg[1]:
                self._added(request_id, error)
        else:  # "dead": the engine loop failed; the process exits next
            self._died(EngineDeadError(msg[1]))

    def _apply(self, deltas: list[Delta]) -> list[RequestOutput]:
        outputs = []
        for delta in deltas:
            request_id, finished = delta[0], delta[1]
            if request_id not in self._streams:  # aborted meanwhile
                continue
            out = apply_delta(self._outputs.pop(request_id, None), delta)
            if not finished:
                self._outputs[request_id] = out
            outputs.append(out)
        return outputs

    def _forget(self, request_id: str, abort: bool) -> None:
        super()._forget(request_id, abort)
        self._outputs.pop(request_id, None)

    def _added(self, request_id: str, error: tuple[bool, str] | None) -> None:
        done = self._adds.pop(request_id, None)
        if done is None or done.done():
            return
        if error is None:
            done.set_result(None)
        else:
            is_value_error, message = error
            done.set_exception((ValueError if is_value_error else RuntimeError)(message))

    def _died(self, error: EngineDeadError) -> None:
        if self.dead_error is None and not self._stop.is_set():
            logger.error("engine process failed: %s", error)
        self.dead_error = self.dead_error or error
        for done in self._adds.values():
            if not done.done():
                done.set_exception(error)
        self._adds.clear()
        self._outputs.clear()
        self._fail_all(error)

    async def _stop_backend(self) -> None:
        if self._thread is None:  # never became ready: nothing to drain
            if self._proc is not None:
                self._proc.terminate()
            return
        await asyncio.to_thread(self._thread.join, 30.0)
        if self._proc is not None:
            await asyncio.to_thread(self._proc.join, 30.0)
            if self._proc.is_alive():
                self._proc.terminate()


# ---- the engine process -----------------------------------------------------------------------


def engine_main(args: EngineArgs, cmd: Connection, out: Connection) -> None:
    """Child process: load the engine, then apply commands and step until told to stop."""
    from engine.llm_engine import LLMEngine, freeze_heap

    # Ctrl-C and a launcher's killpg(SIGTERM) reach the whole process group; the server drains
    # first and then stops the engine (and if the server dies, its command pipe ends: we exit).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    try:
        engine = LLMEngine.from_args(args)
    except Exception as e:
        out.send(("dead", f"loading the model failed: {type(e).__name__}: {e}"))
        return
    freeze_heap()
    out.send(("ready", {"max_model_len": engine.max_model_len}))
    try:
        _loop(engine, cmd, out)
    except (EOFError, BrokenPipeError):
        pass  # the server went away
    except BaseException as e:
        logger.exception("engine loop failed")
        out.send(("dead", f"engine loop failed: {e!r}"))
    finally:
        engine.shutdown()
        gc.unfreeze()  # collectable again at exit (extension modules report what outlives it)


def _loop(engine: Any, cmd: Connection, out: Connection) -> None:
    last_stats = 0.0
    deltas = DeltaEncoder()
    while True:
        if not engine.has_unfinished_requests():
            out.send(("out", [], stats_of(engine)))
            cmd.poll(None)  # idle: wait for a command
        while cmd.poll():
            batch = cmd.recv()
            if batch is None:
                return
            added = []
            for msg in batch:
                if msg[0] == "add":
                    _, request_id, prompt, params, arrival = msg
                    try:
                        engine.add_request(request_id, prompt, params, arrival)
                    except Exception as e:  # bad input: the server turns a ValueError into a 400
                        added.append((request_id, (type(e) is ValueError, str(e))))
                    else:
                        added.append((request_id, None))
                else:
                    engine.abort_request(msg[1])
                    deltas.forget(msg[1])
            if added:
                out.send(("added", added))
        if not engine.has_unfinished_requests():
            continue
        outputs = engine.step()
        now = time.monotonic()
        stats = None
        if now - last_stats >= STATS_INTERVAL_S:
            stats, last_stats = stats_of(engine), now
        if outputs or stats is not None:
            out.send(("out", deltas.encode(outputs), stats))
