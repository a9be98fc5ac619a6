"""Data layer: users, models, trainings, metrics, the model store and safe serialization."""
