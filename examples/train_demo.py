"""ST-Adapters learn the direction a square moves; frame averaging alone cannot.

    python examples/train_demo.py                 # a few minutes on CPU, writes train_demo_out/
    python examples/train_demo.py --quick         # smoke run
    python examples/train_demo.py --help

Same as ``python -m st_adapter_fast train-demo``. The interesting part, in the 5 lines a user
writes to turn an image ViT into a video model (see st_adapter_fast/demo.py:build_model):

    backbone = CLIPVisionTransformer(config)                     # or timm / open_clip ViT
    inject_st_adapters(backbone, adapter_channels=32, positions=("pre_attn", "pre_mlp"))
    model = VideoClassifier(backbone, num_classes=2)             # clips (B, 3, T, H, W) -> logits
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    loss = F.cross_entropy(model(clips), labels)                 # num_frames is set for you
"""

import sys

from st_adapter_fast.demo import main

if __name__ == "__main__":
    sys.exit(main())
