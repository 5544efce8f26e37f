"""Feature spec and output table schemas: the product's data contracts."""
