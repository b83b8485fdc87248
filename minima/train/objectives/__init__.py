"""Training objectives as loss functions over logits: knowledge distillation (kd) and preference
optimisation (dpo: DPO, IPO, SimPO, ORPO).

May import minima.core and torch only.
"""
