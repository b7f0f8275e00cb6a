"""The three daemons' main modules: each composes the layers below (see docs/ARCHITECTURE.md)."""
