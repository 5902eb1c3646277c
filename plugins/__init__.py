"""Plugins: the pluggy hook specs and the built-in plugins (GPU observers, engines)."""
