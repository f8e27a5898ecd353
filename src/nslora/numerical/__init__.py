"""The numerical update: LoRA epochs (`training`), the answer-only loss (`losses`) and exact
per-sample gradient norms (`persample`) recorded while training."""
