"""Staging: the pending changes of each repository on the shared volume.

Its layout belongs to :mod:`cvmfs_publisher.staging.area`; the consumers and
reconciliation use the :class:`~cvmfs_publisher.staging.area.Staging` API only.
"""
