"""Persistence that knows nothing of the domain: the tuning store is a locked JSON map."""
