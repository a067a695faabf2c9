"""Users of the op: ST-Adapters placed into models people already load.

inject       inject_st_adapters / set_num_frames: the family registry and the self-check
families/    one module per backbone family: timm (ViT, Eva), open_clip, openai_clip, hf
             (transformers CLIP / SigLIP / DINOv2), builtin (our CLIP ViT)
clip_vit     the one CLIP ViT of the package (OpenAI layout), official ST-Adapter models
video        VideoClassifier: clips (B, C, T, H, W) -> logits
checkpoint   adapter-only save/load, official ST-Adapter checkpoints
mixed_precision   the official recipe (frozen fp16/bf16 backbone, fp32 adapters, autocast)
"""
