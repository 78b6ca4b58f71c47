"""trainctl: CLI, on-instance agent and checkpoint library."""
