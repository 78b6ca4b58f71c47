"""trainctl_core: the domain model and AWS adapters shared by the Lambda handlers,
the on-instance agent and the CLI. Deployed as the `layers/core` Lambda layer."""
