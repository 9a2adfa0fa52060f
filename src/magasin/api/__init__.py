"""HTTP layer shared by every service: app factory, API-key auth, error mapping, paging."""
