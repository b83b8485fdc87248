"""Training objectives as loss functions over logits: knowledge distillation (kd).

May import minima.core and torch only.
"""
