"""Shared plumbing of the command-line entry points: logging set-up and one-line errors."""

from __future__ import annotations

import json
import logging
import math
import sys

from mor_jax.config import MorJaxError


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Orbax and absl log every checkpoint file operation at INFO.
    for name in ("absl", "orbax", "jax._src"):
        logging.getLogger(name).setLevel(logging.WARNING)


def run_main(main) -> None:
    """Call main(); a MorJaxError becomes one `error: …` line on stderr and exit status 2."""
    setup_logging()
    try:
        main()
    except MorJaxError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


def print_json_line(result: dict) -> None:
    """Print a dict as one JSON line; non-finite floats become null (strict JSON)."""

    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    print(json.dumps({k: clean(v) for k, v in result.items()}), flush=True)
