#!/usr/bin/env python3
"""Checks a Tessera cluster's OpenAI-compatible API with the official `openai` client.

    python scripts/openai_client_check.py --base-url http://127.0.0.1:8000/v1

Lists the models, asks for a completion (greedy, with log-probabilities), streams the same
completion and checks it matches token for token, streams with usage, and sends a bad
request, which must raise the client's BadRequestError with the field named. Prints one
line per check and exits non-zero on the first failure.
"""

import argparse
import sys

import openai


def check(cond, what):
    if not cond:
        print(f"FAIL: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", required=True, help="the API's base, ending in /v1")
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key="unused", max_retries=0)

    models = client.models.list()
    ids = [m.id for m in models.data]
    check(len(ids) == 1, f"models.list names one model: {ids}")
    model = ids[0]

    params = dict(
        model=model,
        prompt="The capital of the cluster is",
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    done = client.completions.create(logprobs=1, **params)
    choice = done.choices[0]
    check(done.object == "text_completion", "a text_completion object")
    check(choice.finish_reason == "length", f"finish_reason length: {choice.finish_reason}")
    check(done.usage.completion_tokens == 12, f"usage: {done.usage}")
    check(done.usage.prompt_tokens > 0, "prompt tokens counted")
    check(
        done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens,
        "total = prompt + completion",
    )
    check(len(choice.logprobs.token_logprobs) == 12, "a log-probability per token")
    check(all(p <= 0 for p in choice.logprobs.token_logprobs), "log-probabilities ≤ 0")

    chunks = list(client.completions.create(stream=True, **params))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    check(streamed == choice.text, f"the stream gives the same text: {streamed!r}")
    check(chunks[-1].choices[0].finish_reason == "length", "the last chunk says length")

    with_usage = list(
        client.completions.create(stream=True, stream_options={"include_usage": True}, **params)
    )
    check(with_usage[-1].usage is not None, "stream_options.include_usage adds usage")
    check(with_usage[-1].usage.completion_tokens == 12, "the streamed usage counts 12 tokens")

    stopped = client.completions.create(stop=[choice.text[3:6]], **params)
    check(
        stopped.choices[0].finish_reason == "stop" and choice.text[3:6] not in stopped.choices[0].text,
        f"a stop string ends the text before it: {stopped.choices[0].text!r}",
    )

    try:
        client.completions.create(model=model, prompt="x", max_tokens=4, top_p=2.0)
        check(False, "top_p 2 is refused")
    except openai.BadRequestError as e:
        check(e.status_code == 400, f"bad request: HTTP {e.status_code}")
        check("top_p" in str(e), f"the error names top_p: {e}")

    try:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=4)
        check(False, "an unknown model is refused")
    except openai.NotFoundError as e:
        check(e.status_code == 404, f"unknown model: HTTP {e.status_code}")

    print("openai client: all checks passed")


if __name__ == "__main__":
    main()
