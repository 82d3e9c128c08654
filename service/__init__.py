"""CT Gatekeeper: everything that runs in production. Never imports torch."""
