"""Provisioning: the publisher queue's messages and the repository announcements."""
