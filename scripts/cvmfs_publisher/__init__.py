"""cvmfs-publisher: S3 (Ceph RGW) uploads to published CernVM-FS repositories.

One module per concept, in layers (docs/ARCHITECTURE.md): ``core/`` (shared,
no outside system), ``adapters/`` (one per outside system), ``pipeline/``
(S3 event -> staged change), ``staging/``, ``provisioning/``, ``operations/``
(operator tools) and ``daemons/`` (the three main modules, which compose them).
"""

__version__ = "0.1.0"
