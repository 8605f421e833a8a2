"""Generate text from a trained run with the serving engine (KV caches, early exit, depth-wise batching).

    python -m mor_jax.tools.generate --run_dir runs/default --prompt "ROMEO." --prompt "JULIET." \\
        [--max_new_tokens 200] [--temperature 0.8] [--top_k 0] [--top_p 1.0] [--seed 0] [--max_batch 32] [--json]

Prompts come from --prompt (repeatable) and/or --prompts_file (one prompt per line). All prompts are served
together, up to --max_batch at once. Request i samples with seed --seed + i, so its text does not depend on the
other prompts. Prints every prompt with its continuation; --json ends with one JSON line {"texts": [...]}.
"""

from __future__ import annotations

import argparse

from mor_jax.cli import print_json_line, run_main
from mor_jax.config import MorJaxError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run_dir", required=True, help="run directory written by train.py")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step to load (default: the latest)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    parser.add_argument("--prompts_file", default=None, help="UTF-8 file with one prompt per line")
    parser.add_argument("--max_new_tokens", type=int, default=200, help="tokens to generate per prompt")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0: greedy)")
    parser.add_argument("--top_k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (1.0: all)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed of the first prompt")
    parser.add_argument("--max_batch", type=int, default=32, help="requests served at once")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the generated texts")
    args = parser.parse_args()

    prompts = list(args.prompt)
    if args.prompts_file:
        try:
            with open(args.prompts_file, encoding="utf-8-sig") as f:  # utf-8-sig drops a byte-order mark
                prompts += [line.rstrip("\n") for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as error:
            raise MorJaxError(f"cannot read --prompts_file {args.prompts_file}: {error}") from error
    if not prompts:
        raise MorJaxError("no prompts; pass --prompt TEXT (repeatable) or --prompts_file FILE")
    if args.max_new_tokens < 1:
        raise MorJaxError(f"--max_new_tokens={args.max_new_tokens} must be >= 1")

    from mor_jax.evaluation import load_run
    from mor_jax.inference import SamplingParams, generate

    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    run = load_run(args.run_dir, args.step)
    texts = generate(run.config.model, run.variables, run.tokenizer, prompts, args.max_new_tokens, sampling,
                     max_batch=args.max_batch, progress=len(prompts) > 1)
    for prompt, text in zip(prompts, texts):
        print(f"--- {prompt!r}")
        print(prompt + text)
    if args.json:
        print_json_line({"texts": texts})


if __name__ == "__main__":
    run_main(main)
