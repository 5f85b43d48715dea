"""What every layer above the core uses to run: structured logs, Prometheus metrics, back-off."""
