"""Text shipped with the package, so that `amoeba build` distils on real text without `--data` (see README.md here)."""

from pathlib import Path

C4_SAMPLE = Path(__file__).with_name("c4_sample.jsonl")

__all__ = ["C4_SAMPLE"]
