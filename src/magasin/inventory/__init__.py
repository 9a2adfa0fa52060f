"""Inventory: stock per (store, product) and all-or-nothing reservations with expiry."""
