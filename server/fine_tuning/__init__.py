"""OpenAI's fine-tuning API on the served model: training files (files.py) and
jobs (jobs.py), whose passes the scheduler runs between inference iterations
(server/engine/training.py)."""
