"""Fan-out work across operators: runs, per-operator items and cursors, the order mirror."""
