"""Timeline events: what the platform did for an operator, recorded once on Stora's timeline."""
