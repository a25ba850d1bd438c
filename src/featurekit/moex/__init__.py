"""MoE-X: the intrinsically interpretable mixture-of-experts layer, and its chess evaluation (moex.chess)."""
