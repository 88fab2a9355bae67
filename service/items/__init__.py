"""The catalog: ``PUT /items/{item_id}`` (add or retitle an item)."""
