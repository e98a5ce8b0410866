"""Users, roles, API tokens and the ONE authorise(actor, action, resource) decision."""
