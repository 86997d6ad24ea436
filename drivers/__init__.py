"""Python device drivers. Each imports only harness.access (and harness.errors)."""
