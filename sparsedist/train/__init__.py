"""Training: the loop (trainer), the student it builds, its optimizer and schedule, losses and evaluation."""
