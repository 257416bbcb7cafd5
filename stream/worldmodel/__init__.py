"""The embedded default model: training (teacher, student), loading the shipped weights, rollouts and evaluation.

It sits above `models/` (the DiT, the world, its autoencoder and text encoder) and `stream/` (the engine that both
the student's self-rollouts in training and every live stream run), like `stream/families.py` does for Wan.
"""
