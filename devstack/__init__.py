"""Real services on loopback for the test suite and the local demo.

One module per service, and one place that knows how to start it: the
pytest fixtures (``tests/conftest.py``) and the demo (``cvmfs-publisher
demo``) both call these functions. Nothing here is used in production.
"""
