"""HTTP routes, one module per resource: predict (predictions, explanations, audit), ops (health, metrics), page."""
