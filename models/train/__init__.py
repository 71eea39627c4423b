"""Trainers: teacher pretraining (and, later, compass NCE and student distillation)."""
