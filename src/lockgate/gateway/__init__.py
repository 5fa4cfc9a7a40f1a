"""The multi-tenant gateway: admission (and, next, tenants, keys, limits, budgets, routing)."""
