"""Image classifiers from timm (auxiliary classifier phi, downstream and feature classifier)."""

from __future__ import annotations

import torch


def build_image_classifier(clf_cfg, num_classes: int) -> torch.nn.Module:
    """A timm model from config; ``pretrained_path`` loads a user-supplied weights file (no hub)."""
    import timm

    kwargs = dict(clf_cfg.kwargs or {})
    if "vit" in clf_cfg.model or "deit" in clf_cfg.model:
        kwargs.setdefault("img_size", clf_cfg.img_size)
    model = timm.create_model(clf_cfg.model, pretrained=False, num_classes=num_classes, **kwargs)
    if clf_cfg.pretrained_path:
        from histodiff.model_files import load_state_dict_file

        state = load_state_dict_file(clf_cfg.pretrained_path)
        # the classification head of a pretrained file has another class count: keep ours
        head = {k for k, v in state.items() if k in model.state_dict() and v.shape != model.state_dict()[k].shape}
        missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if k not in head}, strict=False)
        if unexpected:
            raise ValueError(f"{clf_cfg.pretrained_path}: {len(unexpected)} unexpected keys, e.g. {unexpected[0]}")
    return model
