"""MoE-X: the intrinsically interpretable mixture-of-experts layer (Yang et al., ICML 2025), its baselines, a small LM and its trainer."""
