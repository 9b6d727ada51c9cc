#!/usr/bin/env python3
"""PyTorch reference for batch-1 greedy decode throughput of a GPT-2 model on CPU.

Builds `GPT2LMHeadModel` from a GPT-2 preset config with random init (or loads --checkpoint,
offline), sets `torch.set_num_threads(--threads)`, and for each dtype:

  * f32:  float32 weights and compute;
  * bf16: bfloat16 weights and compute (`model.to(torch.bfloat16)`; torch runs the CPU
          kernels in bf16), the same weights as f32 rounded;

prefills a --prompt-len (16) token prompt with a KV cache, runs --warmup (8) untimed decode
steps, then times --tokens decode steps of a manual loop (batch 1, one new token per step,
`past_key_values`/cache reuse, greedy argmax of the last logits) under
`torch.inference_mode()`. Reports decode tokens/s and ms/token (the timed steps' wall time,
including argmax) as a table, and with --json one JSON line:

  {"engine": "pytorch", "torch": "<version>", "threads": 2,
   "results": [{"dtype": "f32", "decode_tokens_per_s": ..., "ms_per_token": ...}, ...], ...}

Usage (from the repository root):

  HF_HUB_OFFLINE=1 /work/venv/bin/python scripts/bench_torch.py --preset gpt2 --dtype both \\
      --tokens 64 --threads 2 [--checkpoint DIR] [--json]
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

# The GPT-2 presets of Tessera (crates/tessera-model/src/config.rs): n_layer, n_embd, n_head,
# n_positions; vocab 50257, n_inner = 4 * n_embd, gelu_new, tied head.
PRESETS = {
    "gpt2-tiny": (4, 256, 8, 1024),
    "gpt2": (12, 768, 12, 1024),
    "gpt2-medium": (24, 1024, 16, 1024),
    "gpt2-large": (36, 1280, 20, 1024),
    "gpt2-xl": (48, 1600, 25, 1024),
}
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


def build(args):
    if args.checkpoint:
        model = GPT2LMHeadModel.from_pretrained(
            args.checkpoint, dtype=torch.float32, local_files_only=True
        )
        source = f"checkpoint {args.checkpoint}"
    else:
        n_layer, n_embd, n_head, n_positions = PRESETS[args.preset]
        config = GPT2Config(
            vocab_size=50257,
            n_positions=n_positions,
            n_embd=n_embd,
            n_layer=n_layer,
            n_head=n_head,
            n_inner=None,
            activation_function="gelu_new",
            layer_norm_epsilon=1e-5,
            bos_token_id=50256,
            eos_token_id=50256,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        torch.manual_seed(args.seed)
        model = GPT2LMHeadModel(config)
        source = f"preset {args.preset}, random init (seed {args.seed})"
    return model.eval(), source


def bench_one(model, prompt, tokens, warmup):
    """Prefill, `warmup` untimed decode steps, then `tokens` timed ones. Returns step times (s)."""
    with torch.inference_mode():
        ids = torch.tensor([prompt], dtype=torch.long)
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        nxt = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        times = []
        for step in range(warmup + tokens):
            t0 = time.perf_counter()
            out = model(input_ids=nxt, cache=cache, use_cache=True)
            cache = out.past_key_values
            nxt = out.logits[:, -1].argmax(dim=-1, keepdim=True)
            t1 = time.perf_counter()
            if step >= warmup:
                times.append(t1 - t0)
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(description="PyTorch batch-1 GPT-2 decode throughput (CPU).")
    ap.add_argument("--preset", default="gpt2", choices=sorted(PRESETS))
    ap.add_argument("--dtype", default="both", choices=["f32", "bf16", "both"])
    ap.add_argument("--tokens", type=int, default=64, help="timed decode steps")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checkpoint", help="HF GPT-2 checkpoint dir instead of random init")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="also print one JSON line")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    load_before = os.getloadavg()[0]
    model, source = build(args)
    cfg = model.config
    total = args.prompt_len + args.warmup + args.tokens
    if total > cfg.n_positions:
        ap.error(f"prompt + warm-up + tokens = {total} exceeds n_positions = {cfg.n_positions}")
    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=gen).tolist()
    n_params = sum(p.numel() for p in model.parameters())

    results = []
    for name in (["f32", "bf16"] if args.dtype == "both" else [args.dtype]):
        m = model.to(DTYPES[name])  # f32 first, then the same weights rounded to bf16
        times = bench_one(m, prompt, args.tokens, args.warmup)
        elapsed = sum(times)
        results.append(
            {
                "dtype": name,
                "decode_tokens_per_s": args.tokens / elapsed,
                "ms_per_token": 1e3 * elapsed / args.tokens,
                "median_ms_per_token": 1e3 * statistics.median(times),
            }
        )

    print(
        f"PyTorch {torch.__version__} (transformers {transformers.__version__}), "
        f"{args.threads} threads, {platform.processor() or platform.machine()}; "
        f"{source}, {n_params / 1e6:.1f}M params, attention {cfg._attn_implementation}"
    )
    print(
        f"batch 1, prompt {args.prompt_len} tokens, {args.warmup} warm-up + "
        f"{args.tokens} timed decode steps (context {args.prompt_len + args.warmup + 1}"
        f"..{total})"
    )
    load_after = os.getloadavg()[0]
    print(
        f"1-min load average {load_before:.2f} before, {load_after:.2f} after "
        f"({os.cpu_count()} CPUs; other work on them inflates the times)"
    )
    print(f"{'dtype':<6} {'tokens/s':>10} {'ms/token':>10} {'median ms':>10}")
    for r in results:
        print(
            f"{r['dtype']:<6} {r['decode_tokens_per_s']:>10.2f} {r['ms_per_token']:>10.2f} "
            f"{r['median_ms_per_token']:>10.2f}"
        )
    if args.json:
        print(
            json.dumps(
                {
                    "engine": "pytorch",
                    "torch": torch.__version__,
                    "threads": args.threads,
                    "results": results,
                    "model": args.checkpoint or args.preset,
                    "prompt_tokens": args.prompt_len,
                    "warmup_steps": args.warmup,
                    "decode_steps": args.tokens,
                    "loadavg_1min": [round(load_before, 2), round(load_after, 2)],
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
