#!/usr/bin/env python3
"""transformers' batched generation on CPU: the reference for `tessera bench throughput`.

Builds `GPT2LMHeadModel` for a GPT-2 preset with random init (the shape is what matters for
speed), sets `torch.set_num_threads(--threads)`, and for each batch size runs
`model.generate` on `batch` distinct prompts of --prompt-len tokens, greedy, with exactly
--new-tokens new tokens each (`min_new_tokens` = `max_new_tokens`), KV cache on, under
`torch.inference_mode()`. One untimed warm-up per batch size, then --rounds timed runs; the
best is reported as output tokens/s = batch × new tokens ÷ wall time.

    /work/venv/bin/python scripts/bench_torch_batched.py --preset gpt2 --batch 1,8,16,32,64 \\
        --prompt-len 32 --new-tokens 64 --threads 2 [--json]
"""

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from bench_torch import PRESETS  # noqa: E402  (the same preset shapes; scripts/ is on the path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2", choices=sorted(PRESETS))
    ap.add_argument("--batch", default="1,8,16,32,64", help="batch sizes, comma-separated")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n_layer, n_embd, n_head, n_positions = PRESETS[args.preset]
    config = GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions,
        vocab_size=50257, activation_function="gelu_new",
    )
    model = GPT2LMHeadModel(config).eval()
    if args.dtype == "bf16":
        model = model.to(torch.bfloat16)
    results = []
    for batch in [int(b) for b in args.batch.split(",")]:
        g = torch.Generator().manual_seed(batch)
        ids = torch.randint(0, 50000, (batch, args.prompt_len), generator=g)
        mask = torch.ones_like(ids)
        kwargs = dict(
            attention_mask=mask, max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens, do_sample=False, use_cache=True,
            pad_token_id=50256,
        )
        best = None
        with torch.inference_mode():
            model.generate(ids, **kwargs)  # warm-up
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                out = model.generate(ids, **kwargs)
                dt = time.perf_counter() - t0
                assert out.shape == (batch, args.prompt_len + args.new_tokens), out.shape
                best = dt if best is None else min(best, dt)
        tps = batch * args.new_tokens / best
        results.append({"batch": batch, "seconds": best, "output_tokens_per_s": tps})
        if not args.json:
            print(f"batch {batch:>3}: {tps:8.1f} output tokens/s ({best:.2f} s)", flush=True)
    if args.json:
        print(json.dumps({
            "engine": "transformers", "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": args.threads,
            "preset": args.preset, "dtype": args.dtype, "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens, "results": results,
        }))


if __name__ == "__main__":
    main()
