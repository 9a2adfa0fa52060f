"""Audit service: an append-only, hash-chained audit log of every event, tagged by
compliance scope, with alerts for failed payments and inventory shortages."""
