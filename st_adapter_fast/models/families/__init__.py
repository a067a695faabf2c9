"""One module per backbone family that inject_st_adapters knows (the registry is
models/inject.py's FAMILIES): builtin (our CLIP ViT), timm (ViT Block, EvaBlock), open_clip,
openai_clip (OpenAI's clip package), hf (HF transformers CLIP, SigLIP, DINOv2). base holds what
they share."""
