"""Transaction service: the sale aggregate, its choreographed saga and its read model."""
