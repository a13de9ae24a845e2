"""HTTP routes, one module per resource: jobs (certify), models, admin, health."""
