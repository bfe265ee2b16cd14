"""The labeled site's pipeline declared in one place: its stages in order, what each needs from earlier stages,
what it gives to later ones, the config keys its work depends on and the files it writes under the output
folder. ``histodiff.labeled_site.pipeline`` walks this list; resuming (marker keys), skipping and the report
all read it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf


@dataclass(frozen=True)
class Stage:
    """One stage: ``Pipeline.<name>(**needs)`` returns ``gives``; ``config`` keys and ``needs`` keys make its key."""

    name: str
    paper: str
    needs: tuple[str, ...] = ()
    gives: tuple[str, ...] = ()
    config: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    model: bool = False  # its work depends on the delivered model's files


STAGES: tuple[Stage, ...] = (
    Stage("global_model", "stages 1-2: the pre-trained LAE and DM",
          gives=("autoencoder", "unet", "scale", "scheduler", "alphas"),
          config=("dm.num_train_timesteps", "dm.beta_schedule", "dm.beta_start", "dm.beta_end"), model=True),
    Stage("aux_classifier", "stage 3: the auxiliary classifier phi on real tiles", gives=("phi", "phi_size"),
          config=("aux_classifier", "tiles.batch_size"), outputs=("aux_classifier/",)),
    Stage("decoder", "stage 3: decoder fine-tuning D -> D' (eq. 5)", needs=("autoencoder", "phi", "phi_size"),
          gives=("finetuned_autoencoder",), outputs=("decoder/",), model=True,
          config=("augment.lambda_ce", "augment.decoder_steps", "augment.decoder_lr", "lae.perceptual_weight",
                  "weights.perceptual", "tiles.batch_size")),
    Stage("latent_classifier", "stage 4: the noise-aware latent classifier (eq. 6)",
          needs=("autoencoder", "scale", "alphas"), gives=("latent_clf",), outputs=("latent_classifier/",),
          config=("latent_classifier", "augment.latent_eval_timesteps", "tiles.batch_size"), model=True),
    Stage("baseline", "stage 6: the real-only downstream classifier, one per seed", gives=("baseline", "baseline_size", "baseline_seeds"),
          config=("downstream", "tiles.batch_size"), outputs=("baseline_classifier/", "downstream/baseline/")),
    Stage("candidates", "stage 4: classifier-guided generation of candidates",
          needs=("unet", "scheduler", "latent_clf", "finetuned_autoencoder", "scale"), gives=("records", "cand"), model=True,
          config=("dm.ddim_steps", "dm.eta", "dm.guidance_scale", "augment.ratios", "augment.random_ratios",
                  "augment.candidates_factor", "seed"), outputs=("synthetic/",)),
    Stage("scores", "stage 5: features of real and candidate tiles", needs=("baseline", "baseline_size", "cand", "records"),
          gives=("scores",), config=("weights.inception", "weights.inception_path"), outputs=("selection/scores.pt",)),
    Stage("selection", "stage 5: selective and random augmentation sets, FID per set",
          needs=("scores", "records"), gives=("selections", "fid"),
          config=("augment.tau", "augment.feature_threshold", "augment.pixel_threshold", "augment.ratios",
                  "augment.random_ratios"), outputs=("synthetic/manifest.csv",)),
    Stage("downstream", "stage 6: downstream classifiers on real + synthetic tiles, one per setting and seed",
          needs=("selections", "fid", "baseline_seeds", "cand"), gives=("settings",), config=("downstream", "tiles.batch_size"),
          outputs=("downstream/",)),
    Stage("report", "Table 1, confusion matrices and grids", needs=("settings", "cand", "selections"),
          config=("augment.grid_tiles",), outputs=("table1.md", "table1.csv", "confusion/", "grids/")),
)


def config_value(cfg, key: str) -> Any:
    return OmegaConf.select(cfg, key, throw_on_missing=True)
