"""Published JSON Schemas (generated from the `state` models by `make schemas`).

This package holds data only: `DIR` is where the `*.schema.json` files live.
"""

from pathlib import Path

DIR = Path(__file__).parent
