"""File-driven state: models of every file the product reads or writes, and the spool protocol.

No event loop and no network live here; the reconciler and the CLI call into these modules.
"""
