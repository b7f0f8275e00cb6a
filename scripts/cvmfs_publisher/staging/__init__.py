"""Staging: the pending changes of each repository on the shared volume.

Its layout belongs to :mod:`cvmfs_publisher.staging.area`; every other module
uses the :class:`~cvmfs_publisher.staging.area.Staging` API only.
"""
