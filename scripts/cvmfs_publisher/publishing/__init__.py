"""Publishing: a staged batch becomes a published revision (the sync daemon's work)."""
