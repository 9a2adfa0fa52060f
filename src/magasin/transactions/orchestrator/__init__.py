"""The saga orchestrator: the orchestrated way to coordinate a sale (issue 13)."""
