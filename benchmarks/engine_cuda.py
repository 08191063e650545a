"""Engine on CUDA: greedy parity with transformers (fp32) and output tok/s (bf16) vs HF generate.

Run from the repo root on a CUDA machine: `PYTHONPATH=. python3 benchmarks/engine_cuda.py`.
A random ~76M Llama (12 layers, hidden 768, GQA 12/4) built offline with the tests' fixture;
256 requests with long-tailed lengths; HF `generate` with static batches of 32 as the baseline.
"""

import gc
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import transformers as tf

from engine import LLM, SamplingParams
from tests.fixtures_models import build_tiny_model

d = Path(tempfile.mkdtemp())
build_tiny_model(
    d,
    "llama",
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    rope_scaling=None,
)
hf = tf.AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32).cuda().eval()
print("params", sum(p.numel() for p in hf.parameters()) / 1e6, "M")
rng = random.Random(0)
prompts = [[rng.randrange(3, 380) for _ in range(n)] for n in (5, 17, 33, 64)]
llm = LLM(str(d), dtype="float32", device="cuda", num_kv_blocks=256)
outs = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
ok = 0
for p, o in zip(prompts, outs, strict=True):
    ref = hf.generate(
        torch.tensor([p]).cuda(), max_new_tokens=24, do_sample=False, min_new_tokens=24
    )[0, len(p) :].tolist()
    ok += ref == o.outputs[0].token_ids
print(f"greedy parity fp32 CUDA: {ok}/{len(prompts)} equal to transformers")
del llm
torch.cuda.empty_cache()
# Throughput, bf16
N = 256
lens = [
    (
        min(1024, int(rng.lognormvariate(5.0, 0.8)) + 4),
        min(512, int(rng.lognormvariate(4.5, 0.8)) + 4),
    )
    for _ in range(N)
]
reqs = [[rng.randrange(3, 380) for _ in range(i)] for i, _ in lens]
gc.collect()
torch.cuda.empty_cache()
llm = LLM(str(d), dtype="bfloat16", device="cuda", gpu_memory_utilization=0.5)
llm.generate(reqs[:8], SamplingParams(max_tokens=8, ignore_eos=True))
params = [SamplingParams(max_tokens=o, ignore_eos=True, temperature=0) for _, o in lens]
torch.cuda.synchronize()
t = time.perf_counter()
outs = llm.generate(reqs, params)
torch.cuda.synchronize()
dt = time.perf_counter() - t
tok = sum(len(o.outputs[0].token_ids) for o in outs)
print(f"engine bf16 CUDA: {N} requests, {tok} output tokens in {dt:.2f} s = {tok / dt:.0f} tok/s")
hfb = tf.AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.bfloat16).cuda().eval()
for bs in (32,):
    t = time.perf_counter()
    tot = 0
    for i in range(0, N, bs):
        chunk = list(range(i, min(N, i + bs)))
        L = max(lens[j][0] for j in chunk)
        M = max(lens[j][1] for j in chunk)
        ids = torch.zeros(len(chunk), L, dtype=torch.long)
        att = torch.zeros_like(ids)
        for k, j in enumerate(chunk):
            ids[k, L - lens[j][0] :] = torch.tensor(reqs[j])
            att[k, L - lens[j][0] :] = 1
        hfb.generate(
            ids.cuda(),
            attention_mask=att.cuda(),
            max_new_tokens=M,
            min_new_tokens=M,
            do_sample=False,
            pad_token_id=0,
        )
        tot += sum(lens[j][1] for j in chunk)
    torch.cuda.synchronize()
    dt2 = time.perf_counter() - t
    print(
        f"HF generate static batch {bs} bf16: {tot} useful tokens in {dt2:.2f} s = {tot / dt2:.0f} tok/s; engine/HF = {tok / dt / (tot / dt2):.2f}x"
    )
