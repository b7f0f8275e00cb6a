"""cvmfs-publisher: S3 (Ceph RGW) uploads to published CernVM-FS repositories.

The package holds one module per concept (config, amqp, vault, rgw, cvmfs,
staging, events, ...); each daemon under ``daemons/`` is a thin composition
of them.
"""

__version__ = "0.1.0"
