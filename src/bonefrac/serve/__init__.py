"""The bonefrac HTTP service: `create_app(Settings.from_env())` builds the FastAPI app; `bonefrac serve` runs it.

Modules: settings (BONEFRAC_* environment variables), batcher (micro-batching off the event loop), guards
(size cap, rate limit, API key), telemetry (Prometheus text), audit (SQLite review log), routes/ (one module
per resource) and static/ (the offline web page).
"""
