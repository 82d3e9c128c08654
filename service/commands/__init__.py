"""The `gatekeeper` commands: one module per command (group); `main` builds the parser and runs one."""
