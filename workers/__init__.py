"""RQ worker processes for the partner platform (``partner-app worker``)."""
