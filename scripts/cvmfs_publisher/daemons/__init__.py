"""The three daemons: thin compositions of the package's modules."""
