"""State machine definitions (ASL files) and the helpers that render them."""
