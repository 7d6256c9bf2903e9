"""Training of prompts (issue 3)."""
