"""Payment context: charges the bank for a sale and refunds it when the saga compensates."""
