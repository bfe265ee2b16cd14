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
        load_pretrained(model, clf_cfg.pretrained_path, clf_cfg.model)
    return model


def load_pretrained(model: torch.nn.Module, path: str, name: str) -> None:
    """Load a user-supplied weights file into ``model``: every tensor but the classification head must be there
    with its shape (the head is ours: its class count differs), and nothing else; otherwise one-line InputError."""
    from histodiff.errors import InputError
    from histodiff.model_files import load_state_dict_file

    state, own = load_state_dict_file(path), model.state_dict()
    head_name = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ""
    head = {k for k in own if head_name and (k == head_name or k.startswith(head_name + "."))}
    unexpected = sorted(k for k in state if k not in own)
    missing = sorted(k for k in own if k not in state and k not in head)
    reshaped = sorted(k for k in state if k in own and k not in head and state[k].shape != own[k].shape)
    for problem, keys in (("unexpected", unexpected), ("missing", missing), ("of another shape", reshaped)):
        if keys:
            raise InputError(f"pretrained_path {path}: {len(keys)} tensor(s) {problem} for a {name} "
                             f"(e.g. {keys[0]}); is it weights of this model?")
    model.load_state_dict({k: v for k, v in state.items() if k not in head or v.shape == own[k].shape}, strict=False)
