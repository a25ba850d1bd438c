"""featurekit's own small GPT-style LM whose MLPs are dense, Switch-style MoE or MoE-X (docs/moex.md).

It lives under ``models/`` so that ``models.loading.load_model`` reads a trained run folder by name
(``featurekit run``, the feature store, the explorer and autointerp take it like any model) without
``models`` importing ``featurekit.moex`` (the trainer, the chess data and the comparison, downstream).
``layers.py``: the MLP kinds and routers; ``lm.py``: the LM; ``folder.py``: saving, loading, the character
tokenizer.
"""
