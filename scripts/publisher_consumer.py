#!/usr/bin/env python3
"""Historical entry point; the daemon lives in cvmfs_publisher.daemons.publisher_consumer."""

from cvmfs_publisher.daemons.publisher_consumer import main

if __name__ == "__main__":
    raise SystemExit(main())
