"""Operator tools: the admin CLI, reconciliation, migration, health check, Zabbix agent.

Kept free of imports here: ``health`` and ``zabbix_agent`` run with the
standard library only (``python3 -P -m cvmfs_publisher.operations.<name>``).
"""
