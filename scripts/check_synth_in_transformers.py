#!/usr/bin/env python3
"""Checks that a checkpoint written by `tessera model synth` loads and runs in `transformers`.

A synth checkpoint is an HF-compatible GPT-2 directory: `config.json` plus `model.safetensors`
(float32, tensor names prefixed `transformer.`, LM head tied to `transformer.wte.weight`, so
no `lm_head.weight` is stored). This script:

  1. loads it with `GPT2LMHeadModel.from_pretrained(DIR, output_loading_info=True)` (offline)
     and fails unless every key was used: no unexpected keys, no mismatched shapes, no error
     messages, and no missing keys other than the tied `lm_head.weight`; it also checks that
     the head really is tied to `wte`;
  2. runs greedy generation on --prompt-ids for --max-new-tokens steps (all-ones attention
     mask, `eos_token_id=None` so it never stops early, raw logits);
  3. writes --out as JSON:

       {"checkpoint": "DIR", "prompt_ids": [...], "greedy_token_ids": [...],
        "first_step_logits_head": [first 16 float32 logits of step 0]}

     (floats are the exact float32 values, written in full double precision).

Usage (from the repository root):

  cargo run --release -p tessera -- model synth ...   # writes e.g. /tmp/synth-gpt2-tiny
  HF_HUB_OFFLINE=1 /work/venv/bin/python scripts/check_synth_in_transformers.py \\
      --checkpoint /tmp/synth-gpt2-tiny --prompt-ids 1,2,3 --max-new-tokens 8 \\
      --out /tmp/synth-gpt2-tiny.transformers.json

Compare the written ids/logits with Tessera's own run on the same checkpoint and prompt.
Exit status 0 on success; an AssertionError / non-zero status names the problem.
"""

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import GPT2LMHeadModel  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

TIED = {"lm_head.weight"}


def parse_ids(text: str):
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of token ids: {text!r}")
    if not ids:
        raise argparse.ArgumentTypeError("need at least one prompt id")
    return ids


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Load a `tessera model synth` checkpoint in transformers and greedy-decode."
    )
    ap.add_argument("--checkpoint", required=True, type=Path, help="checkpoint directory")
    ap.add_argument("--prompt-ids", required=True, type=parse_ids, help="e.g. 1,2,3")
    ap.add_argument("--max-new-tokens", required=True, type=int)
    ap.add_argument("--out", required=True, type=Path, help="JSON file to write")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    ckpt = args.checkpoint
    assert (ckpt / "config.json").is_file(), f"{ckpt}/config.json not found"
    assert (ckpt / "model.safetensors").is_file() or (
        ckpt / "model.safetensors.index.json"
    ).is_file(), f"{ckpt} has no model.safetensors(.index.json)"
    assert args.max_new_tokens >= 1, "--max-new-tokens must be at least 1"

    model, info = GPT2LMHeadModel.from_pretrained(
        ckpt,
        output_loading_info=True,
        dtype=torch.float32,
        local_files_only=True,
        attn_implementation="eager",  # the literal GPT-2 math, as in tests/fixtures
    )
    model.eval()
    missing = set(info.get("missing_keys", ())) - TIED
    unexpected = set(info.get("unexpected_keys", ()))
    mismatched = list(info.get("mismatched_keys", ()))
    errors = list(info.get("error_msgs", ()))
    assert not missing, f"missing keys: {sorted(missing)}"
    assert not unexpected, f"unexpected keys: {sorted(unexpected)}"
    assert not mismatched, f"shape mismatches: {mismatched}"
    assert not errors, f"load errors: {errors}"
    assert (
        model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    ), "lm_head is not tied to transformer.wte"

    cfg = model.config
    prompt = args.prompt_ids
    assert all(0 <= t < cfg.vocab_size for t in prompt), f"prompt ids must be in [0, {cfg.vocab_size})"
    assert len(prompt) + args.max_new_tokens <= cfg.n_positions + 1, (
        f"{len(prompt)} prompt + {args.max_new_tokens} new tokens exceed n_positions = {cfg.n_positions}"
    )

    ids = torch.tensor([prompt], dtype=torch.long)
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=cfg.eos_token_id if cfg.eos_token_id is not None else 0,
            eos_token_id=None,  # never stop early
        )
    tokens = out.sequences[0, len(prompt):].tolist()
    assert len(tokens) == args.max_new_tokens, (len(tokens), args.max_new_tokens)
    first = out.logits[0][0].float()
    assert int(first.argmax()) == tokens[0], "logits processors changed the greedy choice"

    result = {
        "checkpoint": str(ckpt),
        "prompt_ids": prompt,
        "greedy_token_ids": tokens,
        "first_step_logits_head": [float(x) for x in first[:16].tolist()],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result) + "\n")
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"{ckpt}: loaded {n_params:,} parameters (n_layer {cfg.n_layer}, n_embd {cfg.n_embd}, "
        f"vocab {cfg.vocab_size}); all keys used, lm_head tied"
    )
    print(f"prompt {prompt} -> greedy {tokens}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
