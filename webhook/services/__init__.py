"""Work the server and the CLI ask for, built on the adapters: mirror verification and copies,
prewarming, vulnerability scanning with its verdict cache and background indexing."""
