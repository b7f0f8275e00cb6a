#!/usr/bin/env python3
"""Historical entry point; the daemon lives in cvmfs_publisher.daemons.repo_sync."""

from cvmfs_publisher.daemons.repo_sync import main

if __name__ == "__main__":
    raise SystemExit(main())
