"""The worklist's routes by concern: `pages` (HTML), `api` (JSON under /api), `health` (/healthz, /readyz)."""
