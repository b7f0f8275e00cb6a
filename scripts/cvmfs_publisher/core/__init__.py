"""The shared core: configuration, errors, logging, status, names, backoff, start-up.

Nothing here talks to an outside system; every other layer may import it.
"""
