"""Write operations of the data layer (business rules live here, not in views)."""
