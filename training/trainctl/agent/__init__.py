"""The on-instance agent: supervises the training process and reacts to interruptions."""
