"""Training: the loop (trainer), one optimizer step (step), the schedule, losses, teacher and evaluation."""
