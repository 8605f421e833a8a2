"""Evaluate a trained run: python eval.py --run_dir runs/default"""

import argparse

from mor_jax.cli import print_json_line, run_main


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Restore the latest checkpoint of a run, report held-out loss, bits per byte, perplexity and "
        "routing statistics, and print a generated sample.",
    )
    parser.add_argument("--run_dir", required=True, help="run directory written by train.py")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step to load (default: the latest)")
    parser.add_argument("--max_batches", type=int, default=0, help="validation batches to use (0: all)")
    parser.add_argument("--prompt", default="ROMEO.\n", help="prompt of the generated sample")
    parser.add_argument("--max_new_tokens", type=int, default=200, help="length of the sample in tokens (0: none)")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0: greedy)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    args = parser.parse_args()

    from mor_jax.evaluation import evaluate_run, generate_text, load_run

    run = load_run(args.run_dir, args.step)
    result = evaluate_run(run, args.max_batches)
    if args.max_new_tokens:
        sample = generate_text(run, args.prompt, args.max_new_tokens, args.temperature, args.seed)
        print("--- sample ---")
        print(args.prompt + sample)
        print("--------------")
    print_json_line(result)


if __name__ == "__main__":
    run_main(main)
