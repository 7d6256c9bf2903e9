"""P-tuning on a frozen model: prompt encoders, data, the training loop."""
