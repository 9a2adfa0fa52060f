"""The operator console: a browser page, served at `/console`, that watches and steers the
store chain through the public HTTP API (see routes.py and static/)."""
