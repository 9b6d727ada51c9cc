#!/usr/bin/env python3
"""Builds Tessera's reference fixtures from Hugging Face `transformers` (CPU, float32).

Writes, under tests/fixtures/ (removing and re-creating exactly these two folders):

  tiny-gpt2/                    config.json, generation_config.json, model.safetensors (f32),
                                expected.json
  tiny-gpt2-bf16-sharded/       the same weights rounded to bfloat16 and saved sharded:
                                config.json, generation_config.json,
                                model.safetensors.index.json, model-0000k-of-0000n.safetensors,
                                expected.json

The model is a `GPT2LMHeadModel(GPT2Config(...))` built under a fixed seed (no hub access),
with every parameter perturbed after init so that a loader that skips a tensor (LayerNorm
gains/biases, linear biases, ...) gives different logits.

expected.json format:

  {"model": "tiny-gpt2", "cases": [
    {"name": "short", "prompt_ids": [...], "max_new_tokens": 8,
     "greedy_token_ids": [... 8 ids ...],
     "step_logits": [[1000 floats: last-position logits after the prompt], [step 1], ...]}]}

`step_logits[i]` are the raw float32 logits from which `greedy_token_ids[i]` is the argmax.
Floats are written as the shortest decimal that reads back to the same float32 (checked
here for every value); parse them as f32 (or as f64 then cast to f32) to get the exact
values. The bf16 fixture's expectations are those of the bf16 weights upcast to float32
and run in float32 (what an engine that upcasts bf16 weights computes).

Expected outputs come from `model.generate(...)` (greedy, raw `output_logits`, all-ones
attention mask, `eos_token_id=None` so generation never stops early) and are checked against
a manual greedy loop with a KV cache (must agree bit for bit), against full no-cache
recomputation and the SDPA attention path (within 1e-4), and against the checkpoint as
reloaded from disk (bit for bit). Every greedy choice must win by a margin of at least
MIN_MARGIN over the runner-up so that engines with f32 rounding differences pick the same
token.

Usage (from the repository root; deterministic, rerunnable):

  HF_HUB_OFFLINE=1 /work/venv/bin/python scripts/make_fixtures.py [--out tests/fixtures]
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
torch.set_num_threads(2)

EOS = 999
INIT_SEED = 20240601
PERTURB_SEED = 7
PROMPT_SEED = 3
# Greedy picks must beat the runner-up by this much (float32 logits).
MIN_MARGIN = 1e-3

CONFIG = dict(
    vocab_size=1000,
    n_positions=64,
    n_embd=96,
    n_layer=6,
    n_head=12,
    n_inner=None,  # 4 * n_embd = 384
    activation_function="gelu_new",
    layer_norm_epsilon=1e-5,
    bos_token_id=EOS,
    eos_token_id=EOS,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    # GPT-2's default 0.02 makes a random tiny model copy its last input token forever
    # (the residual stream dominates the tied head). 0.1 gives varied greedy continuations
    # with well-separated top logits.
    initializer_range=0.1,
)


def build_model() -> GPT2LMHeadModel:
    config = GPT2Config(**CONFIG)
    torch.manual_seed(INIT_SEED)
    model = GPT2LMHeadModel(config)
    model.set_attn_implementation("eager")
    model.eval()
    gen = torch.Generator().manual_seed(PERTURB_SEED)

    def uniform(shape, half_width):
        return (torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1) * half_width

    with torch.no_grad():
        # named_parameters() lists the tied wte / lm_head weight once.
        for name, p in model.named_parameters():
            if ".ln_" in name or name.startswith("transformer.ln_f"):
                if name.endswith(".weight"):
                    p.copy_(1.0 + uniform(p.shape, 0.1))
                else:
                    p.copy_(uniform(p.shape, 0.05))
            elif name.endswith(".bias"):
                p.copy_(uniform(p.shape, 0.05))
            else:  # wte, wpe and every Conv1D matrix: keep the init, add noise
                p.add_(uniform(p.shape, 0.01))
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32, name
        if name.endswith(".bias"):
            assert torch.all(p != 0), f"{name} has zeros"
        if ".ln_" in name and name.endswith(".weight"):
            assert not torch.all(p == 1), f"{name} is all ones"
    return model


def cases():
    gen = torch.Generator().manual_seed(PROMPT_SEED)
    long_prompt = torch.randint(0, EOS, (48,), generator=gen).tolist()
    return [
        ("short", [899, 749, 92, 496, 877], 8),
        ("with_eos", [31, 250, EOS, 512, 77], 6),
        ("long", long_prompt, 16),
        ("single", [42], 8),
    ]


def generate_hf(model, prompt, n):
    ids = torch.tensor([prompt], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=EOS,
            eos_token_id=None,  # never stop early; 999 may be generated like any token
        )
    tokens = out.sequences[0, len(prompt):].tolist()
    logits = torch.stack([l[0] for l in out.logits]).float()
    assert len(tokens) == n and logits.shape == (n, CONFIG["vocab_size"]), (len(tokens), logits.shape)
    return tokens, logits


def generate_manual(model, prompt, n):
    """Greedy loop with a KV cache: prefill the prompt, then one token per step."""
    ids = torch.tensor([prompt], dtype=torch.long)
    tokens, rows = [], []
    with torch.no_grad():
        # logits_to_keep=1 as generate() does: the LM head then multiplies one row, which
        # rounds exactly like generate (all rows differ from it by up to ~1e-6).
        out = model(
            input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1
        )
        past = out.past_key_values
        logits = out.logits[0, -1]
        mask_len = len(prompt)
        for _ in range(n):
            rows.append(logits.clone())
            nxt = int(torch.argmax(logits))
            tokens.append(nxt)
            mask_len += 1
            out = model(
                input_ids=torch.tensor([[nxt]]),
                attention_mask=torch.ones(1, mask_len, dtype=torch.long),
                cache=past,
                use_cache=True,
                logits_to_keep=1,
            )
            past = out.past_key_values
            logits = out.logits[0, -1]
    return tokens, torch.stack(rows)


def recompute_full(model, prompt, tokens):
    """Logits of every step from full no-cache forwards of the whole sequence."""
    seq = torch.tensor([prompt + tokens], dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=seq, attention_mask=torch.ones_like(seq), use_cache=False)
    p = len(prompt)
    return out.logits[0, p - 1 : p - 1 + len(tokens)]


def shortest_f32(v: np.float32) -> float:
    """The shortest-decimal Python float that reads back (f64 -> f32) to exactly `v`."""
    short = float(np.format_float_positional(v, unique=True, trim="-")) if np.isfinite(v) else None
    if short is None:
        raise ValueError(f"non-finite logit {v}")
    if np.float32(short) != v:  # would only happen on a double-rounding corner case
        short = float(v)
    assert np.float32(short) == v
    return short


def compute_expected(model, label):
    """Runs every case; returns (json-ready cases, report lines)."""
    sdpa = None
    results, report = [], []
    for name, prompt, n in cases():
        tokens, logits = generate_hf(model, prompt, n)
        m_tokens, m_logits = generate_manual(model, prompt, n)
        assert m_tokens == tokens, f"{label}/{name}: generate {tokens} != manual loop {m_tokens}"
        assert torch.equal(m_logits, logits), (
            f"{label}/{name}: generate vs manual loop logits differ by "
            f"{(m_logits - logits).abs().max().item():.3g}"
        )
        argmax = logits.argmax(dim=-1).tolist()
        assert argmax == tokens, f"{label}/{name}: logits processors changed the choice"
        full = recompute_full(model, prompt, tokens)
        full_diff = (full - logits).abs().max().item()
        assert full_diff < 1e-4, f"{label}/{name}: cache vs full recompute differ by {full_diff}"
        if sdpa is None:
            sdpa = GPT2LMHeadModel(model.config)
            sdpa.load_state_dict(model.state_dict())
            sdpa.set_attn_implementation("sdpa")
            sdpa.eval()
        s_tokens, s_logits = generate_hf(sdpa, prompt, n)
        sdpa_diff = (s_logits - logits).abs().max().item()
        assert s_tokens == tokens and sdpa_diff < 1e-4, f"{label}/{name}: sdpa differs by {sdpa_diff}"
        top2 = logits.topk(2, dim=-1).values
        margin = (top2[:, 0] - top2[:, 1]).min().item()
        assert margin >= MIN_MARGIN, f"{label}/{name}: top-2 margin {margin:.3g} < {MIN_MARGIN}"
        rows = logits.numpy().astype(np.float32)
        results.append(
            {
                "name": name,
                "prompt_ids": prompt,
                "max_new_tokens": n,
                "greedy_token_ids": tokens,
                "step_logits": [[shortest_f32(v) for v in row] for row in rows],
            }
        )
        report.append(
            f"  {label:<22} {name:<9} prompt {len(prompt):>2} + {n:>2} new -> {tokens}"
            f"  (min top-2 margin {margin:.4f}, |cache-full| {full_diff:.1e},"
            f" |eager-sdpa| {sdpa_diff:.1e}, generate == manual loop bit for bit)"
        )
    return results, report


def write_expected(path: Path, model_name: str, results):
    text = json.dumps({"model": model_name, "cases": results}, separators=(",", ":"))
    path.write_text(text + "\n")
    # Read back and check every float is exactly the float32 we computed.
    back = json.loads(path.read_text())
    for case, ref in zip(back["cases"], results):
        got = np.asarray(case["step_logits"], dtype=np.float32)
        want = np.asarray(ref["step_logits"], dtype=np.float32)
        assert np.array_equal(got, want)


def tidy(dir_: Path, keep):
    for entry in dir_.iterdir():
        if not keep(entry.name):
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def reload_logits(dir_: Path, prompt):
    model = GPT2LMHeadModel.from_pretrained(dir_, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1)
        return model, out.logits[0, -1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    root = Path(__file__).resolve().parent.parent
    ap.add_argument("--out", type=Path, default=root / "tests" / "fixtures")
    args = ap.parse_args()

    out_f32 = args.out / "tiny-gpt2"
    out_bf16 = args.out / "tiny-gpt2-bf16-sharded"
    for d in (out_f32, out_bf16):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)

    report = []
    model = build_model()
    n_params = sum(p.numel() for p in model.parameters())

    # --- float32, single file -------------------------------------------------------------
    model.save_pretrained(out_f32, safe_serialization=True)
    tidy(out_f32, lambda n: n in ("config.json", "generation_config.json", "model.safetensors"))
    results, lines = compute_expected(model, "tiny-gpt2")
    report += lines
    write_expected(out_f32 / "expected.json", "tiny-gpt2", results)
    reloaded, got = reload_logits(out_f32, results[0]["prompt_ids"])
    want = torch.tensor(results[0]["step_logits"][0], dtype=torch.float32)
    assert torch.equal(got, want), "f32 checkpoint does not reload to the same logits"
    for (k, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), k

    # --- bfloat16, sharded ---------------------------------------------------------------
    model_bf16 = GPT2LMHeadModel(model.config)
    model_bf16.load_state_dict(model.state_dict())
    model_bf16 = model_bf16.to(torch.bfloat16).eval()
    model_bf16.save_pretrained(out_bf16, safe_serialization=True, max_shard_size="300KB")
    tidy(
        out_bf16,
        lambda n: n in ("config.json", "generation_config.json", "model.safetensors.index.json")
        or (n.startswith("model-") and n.endswith(".safetensors")),
    )
    shards = sorted(p.name for p in out_bf16.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out_bf16 / "model.safetensors.index.json").exists(), shards
    upcast = model_bf16.float()
    upcast.set_attn_implementation("eager")
    upcast.eval()
    results_bf16, lines = compute_expected(upcast, "tiny-gpt2-bf16-sharded")
    report += lines
    write_expected(out_bf16 / "expected.json", "tiny-gpt2-bf16-sharded", results_bf16)
    reloaded, got = reload_logits(out_bf16, results_bf16[0]["prompt_ids"])
    want = torch.tensor(results_bf16[0]["step_logits"][0], dtype=torch.float32)
    assert torch.equal(got, want), "bf16 sharded checkpoint does not reload to the same logits"
    from safetensors import safe_open

    for shard in shards:
        with safe_open(out_bf16 / shard, "pt") as f:
            for k in f.keys():
                assert f.get_slice(k).get_dtype() == "BF16", (shard, k)
    same_tokens = sum(a["greedy_token_ids"] == b["greedy_token_ids"] for a, b in zip(results, results_bf16))

    # --- summary ---------------------------------------------------------------------------
    print(f"tiny-gpt2: {n_params:,} parameters (LM head tied), config {CONFIG}")
    total = 0
    for d in (out_f32, out_bf16):
        for p in sorted(d.iterdir()):
            size = p.stat().st_size
            total += size
            print(f"  {p.relative_to(args.out.parent) if args.out.parent in p.parents else p}: {size:,} B")
    print(f"  total: {total:,} B ({total / 2**20:.2f} MiB)")
    print("cases:")
    print("\n".join(report))
    print(f"  bf16 greedy ids equal f32 ones in {same_tokens}/{len(results)} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
