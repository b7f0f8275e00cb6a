"""One adapter per outside system (AMQP, RabbitMQ management API, S3/RGW, Vault).

Each is the only module that imports its client library, so a library's
errors are translated into :mod:`cvmfs_publisher.core.errors` in one place.
"""
