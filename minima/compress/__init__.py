"""Compression: importance scores, structured pruning, and the teacher's logit cache for distillation.

May import minima.train and everything below it.
"""
