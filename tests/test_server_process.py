"""`python -m engine.serve` as a real process: flags, readiness, the openai client, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.engine_process import free_port, start_engine, wait_healthy


def test_bad_flag_fails_before_serving(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from engine.serve import main

    assert main(["--model", str(tmp_path / "missing"), "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "model must be" in err and "does not exist" in err


@pytest.mark.slow
def test_process_serves_and_drains_on_sigterm(tiny_llama_dir: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_engine(
        "--model", str(tiny_llama_dir), "--port", str(port), "--max-model-len", "256",
        "--kv-cache-gib", "0.05", "--served-model-name", "tiny", "--shutdown-timeout", "20",
        env={"SKYBROKER_API_KEY": "k3y"},
    )  # fmt: skip
    try:
        wait_healthy(proc, url)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k3y", max_retries=0)
        r = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=4
        )
        assert r.usage.completion_tokens == 4
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="bad", max_retries=0).models.list()

        # SIGTERM while a stream is in flight: it still runs to its end, then the process exits.
        events: list[str] = []
        streaming = threading.Event()
        body = {"model": "tiny", "prompt": "the cat", "max_tokens": 60, "ignore_eos": True,
                "stream": True}  # fmt: skip

        def read() -> None:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120,
                              headers={"Authorization": "Bearer k3y"}) as resp:  # fmt: skip
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        events.append(line)
                        streaming.set()

        reader = threading.Thread(target=read)
        reader.start()
        assert streaming.wait(120)
        proc.send_signal(signal.SIGTERM)
        reader.join(120)
        # uvicorn re-raises the signal once it has shut down cleanly: -SIGTERM, not a crash.
        assert proc.wait(60) in (0, -signal.SIGTERM)
        log = proc.stdout.read() if proc.stdout else ""
        assert "Application shutdown complete" in log, log
        assert events[-1] == "data: [DONE]"
        finish = [json.loads(e[6:])["choices"][0]["finish_reason"] for e in events[:-1]]
        assert finish[-1] == "length"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


@pytest.mark.slow
def test_engine_process_front(tiny_llama_dir: Path) -> None:
    """ProcessLLMEngine (the engine in a child process): same outputs as offline, bad input is
    a ValueError, closing a stream aborts it, a dead engine process fails requests cleanly."""
    from engine import LLM, SamplingParams
    from engine.config import EngineArgs
    from engine.server.async_engine import EngineDeadError
    from engine.server.engine_process import ProcessLLMEngine

    kw = dict(max_model_len=256, num_kv_blocks=160, block_size=16, max_num_seqs=16)
    ids = [5, 17, 42, 99, 7, 64] * 30  # long prompts: outputs bigger than one pipe read
    params = SamplingParams(n=2, temperature=0.8, seed=7, max_tokens=6)
    offline = LLM(str(tiny_llama_dir), **kw)
    expected = [c.token_ids for c in offline.generate(ids, params)[0].outputs]
    offline.shutdown()

    async def run() -> None:
        eng = ProcessLLMEngine(EngineArgs(model=str(tiny_llama_dir), **kw))
        await eng.launch()
        try:
            assert eng.is_running and eng.max_model_len == 256
            assert eng.tokenizer.encode("the cat")
            outs = [o async for o in await eng.add_request("a", ids, params)]
            assert outs[-1].finished
            assert [c.token_ids for c in outs[-1].outputs] == expected
            with pytest.raises(ValueError, match="prompt token ids must be in"):
                await eng.add_request("b", [1, 10**6], SamplingParams(max_tokens=2))

            long = SamplingParams(max_tokens=200, ignore_eos=True)
            stream = await eng.add_request("c", ids, long)
            await stream.__aiter__().__anext__()
            stream.close()  # aborts it in the engine process
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and eng.stats.num_running:
                await asyncio.sleep(0.05)
            assert eng.stats.num_running == 0 and eng.num_unfinished == 0

            stream = await eng.add_request("d", ids, long)
            assert eng._proc is not None
            eng._proc.kill()
            with pytest.raises(EngineDeadError):
                async for _ in stream:
                    pass
            assert not eng.is_running
            with pytest.raises(EngineDeadError):
                await eng.add_request("e", ids, long)
        finally:
            await eng.shutdown()

    try:  # the loop uvicorn picks when it is installed
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(run())
