"""`orchctl`'s entry point, light on purpose: it takes the stop signals over before the heavy
imports (`early_signals`), so that `orchctl serve` stopped in its first second (a service
manager stopping a unit it has just started) still stops cleanly, exit 0, instead of dying of
the signal.
"""

from __future__ import annotations

from reconciler import early_signals


def main() -> int:
    early_signals.install()
    from reconciler import cli

    return cli.main()


if __name__ == "__main__":
    raise SystemExit(main())
