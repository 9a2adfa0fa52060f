"""Kernel shared by every bounded context: messages, ids, errors, clock."""
