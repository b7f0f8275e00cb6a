"""Real services on loopback for the test suite and the local demo.

One module per service, and one place that knows how to start it: the
pytest fixtures (``tests/conftest.py``), the benchmarks and the demo
(``tools/demo.sh``) all call these functions. It lives outside the package
(importable from the repository root), so nothing here ships in the wheel or
the images.
"""
