#!/usr/bin/env python3
"""Historical entry point; the daemon lives in cvmfs_publisher.daemons.repo_consumers."""

from cvmfs_publisher.daemons.repo_consumers import main

if __name__ == "__main__":
    raise SystemExit(main())
