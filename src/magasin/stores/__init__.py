"""Store service: the stores, the product catalog and the preparation of orders."""
