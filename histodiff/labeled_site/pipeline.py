"""The labeled site's pipeline (paper stages 3-6): ``Pipeline.run`` walks the declared stages in order.

``STAGES`` (``stage_plan.py``) says, for every stage, what it needs from earlier stages, what it gives to later ones, the config
keys its work depends on and the files it writes. The same declaration drives resuming (a stage's marker key
is the digest of its inputs' keys and its config values, so a change reruns exactly the stages downstream of
it), skipping (a stage whose marker matches is not rerun) and the report (``results.json`` lists the stages
that ran and were skipped). ``Pipeline.run`` only walks it.

Length: about 330 lines, one method per declared stage, kept in one class so that each stage's work sits
beside its marker and its products."""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import ConcatDataset

from histodiff.data import TileFolder, TileOptions, TileIndex
from histodiff.labeled_site.inputs import LabeledInputs, load_inputs
from histodiff.labeled_site.stage_plan import STAGES, Stage, config_value
from histodiff.labeled_site.stage_markers import Stages, digest, files_fingerprint
from histodiff.local_training.trainer_setup import on_gpu

log = logging.getLogger("histodiff.augment")


def _tiles(inp: LabeledInputs, size: int, positions: list[int], augment: bool) -> TileFolder:
    return TileFolder(inp.labeled.index, TileOptions(size, augment=augment), subset=positions)


def _fingerprint(folder: TileFolder) -> str:
    return files_fingerprint([folder.index.root / rel for rel, _ in folder.index.entries])


def _model_fingerprint(model_dir: Path) -> str:
    return files_fingerprint(sorted(p for p in model_dir.rglob("*") if p.is_file()))


def _check_weights(cfg) -> Any:
    """Resolve the offline weights now, so a missing file stops the run before any training."""
    from histodiff.evaluation.inception import load_inception
    from histodiff.weights.locate import locate_vgg16

    if cfg.lae.perceptual_weight > 0 and cfg.augment.decoder_steps > 0 and cfg.weights.perceptual != "random":
        locate_vgg16(cfg.weights)
    return load_inception(cfg.weights)


class Pipeline:
    """The stages of ``STAGES`` as methods; ``run`` walks the declaration and writes ``results.json``."""

    def __init__(self, cfg, data: Path, test: Path, model_dir: Path, out: Path) -> None:
        self.cfg, self.out, self.model_dir = cfg, out, model_dir
        self.inp = load_inputs(cfg, data, test, model_dir, out / "work")
        self.inception = _check_weights(cfg)
        self.classes, self.K = self.inp.classes, len(self.inp.classes)
        self.size, self.bs = cfg.tiles.image_size, cfg.tiles.batch_size
        # inference (sampling, encoding, features) on the training accelerator when it is a GPU
        self.device = torch.device("cuda" if on_gpu(cfg.train) else "cpu")
        self.stages = Stages(out)
        self.keys: dict[str, str] = {}
        entries = self.inp.labeled.index.entries
        self.train_counts = {c: 0 for c in range(self.K)}
        for i in self.inp.train_idx:
            self.train_counts[entries[i][1]] += 1
        self.train_aug = _tiles(self.inp, self.size, self.inp.train_idx, True)
        self.train_plain = _tiles(self.inp, self.size, self.inp.train_idx, False)
        self.val = _tiles(self.inp, self.size, self.inp.val_idx, False)
        a = cfg.augment
        base = [_fingerprint(self.inp.labeled), _fingerprint(self.inp.test), self.size, cfg.seed, a.val_fraction,
                a.min_val_per_class]
        if any(g is not None for g in self.inp.labeled.groups):
            # a split by slide: the groups decide it too (a per-tile split keeps the keys of earlier runs)
            base.append({"split_groups": self.inp.labeled.groups})
        self.base = digest(*base)
        self.model_fp = _model_fingerprint(model_dir)
        self.results: dict[str, Any] = {
            "classes": self.classes, "profile": cfg.profile, "image_size": self.size, "seed": cfg.seed,
            "seeds": list(a.seeds), "tiles": {"train": len(self.inp.train_idx), "val": len(self.inp.val_idx),
                                               "test": len(self.inp.test)},
            "train_counts": {self.classes[c]: n for c, n in self.train_counts.items()},
        }

    # ------------------------------------------------------------------------------- the walk

    def _config(self, stage: Stage) -> list[Any]:
        return [config_value(self.cfg, k) for k in stage.config]

    def _key(self, stage: Stage, producer: dict[str, str]) -> str:
        upstream = list(dict.fromkeys(self.keys[producer[n]] for n in stage.needs))
        return digest(stage.name, self.base, self.model_fp if stage.model else None, upstream, self._config(stage))

    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        products: dict[str, Any] = {}
        producer: dict[str, str] = {}
        for stage in STAGES:
            self.keys[stage.name] = self._key(stage, producer)
            gives = getattr(self, stage.name)(stage, **{n: products[n] for n in stage.needs})
            if set(gives) != set(stage.gives):
                raise RuntimeError(f"stage {stage.name} gave {sorted(gives)}, its declaration says {list(stage.gives)}")
            products.update(gives)
            producer.update({n: stage.name for n in gives})
        self.results["stages"] = {"ran": self.stages.ran, "skipped": self.stages.skipped}
        self.results["seconds"] = time.perf_counter() - started
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1, default=str))
        log.info("done: %s, %s", self.out / "table1.md", self.out / "results.json")
        return self.results

    # ------------------------------------------------------------------------------- stages 1-2

    def global_model(self, stage: Stage) -> dict[str, Any]:
        from histodiff.diffusion.noise_schedule import build_ddim
        from histodiff.model_files import load_global_model

        autoencoder, unet, info = load_global_model(self.model_dir, self.cfg)
        scheduler = build_ddim(self.cfg.dm)
        return {"autoencoder": autoencoder, "unet": unet, "scale": float(info["scale_factor"]),
                "scheduler": scheduler, "alphas": scheduler.alphas_cumprod.clone()}

    # ------------------------------------------------------------------------------- stage 3

    def aux_classifier(self, stage: Stage) -> dict[str, Any]:
        from histodiff.evaluation.trained_classifiers import load_classifier, save_classifier, train_site_classifier

        cfg, where, key = self.cfg, self.out / "aux_classifier", self.keys[stage.name]
        rec = self.stages.done(stage.name, key)
        if rec is None:
            log.info("stage aux_classifier: training phi (%s) on %d real tiles", cfg.aux_classifier.model, len(self.train_aug))
            trained = train_site_classifier(cfg, cfg.aux_classifier, self.train_aug, self.val, self.K, cfg.seed, "aux phi")
            save_classifier(where, trained, cfg.aux_classifier, self.classes)
            rec = self.stages.mark(stage.name, key, best_val_accuracy=trained.best_val_accuracy)
        self.results["aux_classifier"] = {"val_accuracy": rec["best_val_accuracy"], "path": str(where)}
        phi, meta = load_classifier(where)
        return {"phi": phi, "phi_size": meta["img_size"]}

    def decoder(self, stage: Stage, autoencoder, phi, phi_size: int) -> dict[str, Any]:
        from diffusers import AutoencoderKL

        from histodiff.finetune.decoder_finetune import finetune_decoder, phi_on_reconstructions
        from histodiff.model_files import save_pretrained_atomic

        cfg, a, where, key = self.cfg, self.cfg.augment, self.out / "decoder", self.keys[stage.name]
        rec = self.stages.done(stage.name, key)
        if rec is None:
            log.info("stage decoder: fine-tuning D for %d steps (lambda_CE %.3g)", a.decoder_steps, a.lambda_ce)
            tuned = copy.deepcopy(autoencoder)
            before = phi_on_reconstructions(tuned, phi, phi_size, self.val, self.bs, self.device)
            losses = finetune_decoder(cfg, tuned, phi, phi_size, self.train_aug) if a.decoder_steps > 0 else {}
            after = phi_on_reconstructions(tuned.to(self.device), phi, phi_size, self.val, self.bs, self.device)
            save_pretrained_atomic(tuned.cpu(), where)
            del tuned
            rec = self.stages.mark(stage.name, key, val_before=before, val_after=after, train_losses=losses)
        self.results["decoder"] = {"path": str(where), "val_before": rec["val_before"], "val_after": rec["val_after"],
                                   "train_losses": rec["train_losses"]}
        return {"finetuned_autoencoder": AutoencoderKL.from_pretrained(str(where)).eval().requires_grad_(False)}

    # ------------------------------------------------------------------------------- stage 4

    def latent_classifier(self, stage: Stage, autoencoder, scale: float, alphas: torch.Tensor) -> dict[str, Any]:
        from histodiff.guidance.latent_classifier_net import TimeLatentClassifier, build_latent_classifier
        from histodiff.guidance.latent_classifier_training import (
            accuracy_by_timestep,
            encode_latents,
            train_latent_classifier,
        )
        from histodiff.model_files import save_pretrained_atomic

        cfg, where, key = self.cfg, self.out / "latent_classifier", self.keys[stage.name]
        # the pre-trained encoder E (frozen in fine-tuning): these latents are the DM's training latents
        rec = self.stages.done(stage.name, key)
        if rec is None:
            z_tr, y_tr = encode_latents(autoencoder, self.train_plain, scale, self.bs, True, self.device)
            z_va, y_va = encode_latents(autoencoder, self.val, scale, self.bs, False, self.device)
            autoencoder.cpu()
            log.info("stage latent_classifier: %d steps on %d noised latents, t ~ U(1, T)", cfg.latent_classifier.steps, len(z_tr))
            clf = build_latent_classifier(cfg, self.K)
            loss = train_latent_classifier(cfg, clf, alphas, z_tr, y_tr)
            acc = accuracy_by_timestep(clf.cpu(), alphas, z_va, y_va, cfg.augment.latent_eval_timesteps, seed=cfg.seed)
            log.info("latent classifier held-out accuracy by t: %s", ", ".join(f"t={t}: {v:.3f}" for t, v in acc.items()))
            save_pretrained_atomic(clf, where)
            rec = self.stages.mark(stage.name, key, final_loss=loss,
                                   val_accuracy_by_t={str(t): v for t, v in acc.items()}, val_latents=len(z_va))
        self.results["latent_classifier"] = {"path": str(where), "final_loss": rec["final_loss"],
                                             "val_accuracy_by_t": rec["val_accuracy_by_t"]}
        return {"latent_clf": TimeLatentClassifier.from_pretrained(str(where)).eval().requires_grad_(False)}

    def candidates(self, stage: Stage, unet, scheduler, latent_clf, finetuned_autoencoder, scale: float) -> dict[str, Any]:
        from histodiff.guidance.candidates import candidate_counts, generate_candidates

        cfg, a, where, key = self.cfg, self.cfg.augment, self.out / "synthetic", self.keys[stage.name]
        counts = candidate_counts(self.train_counts, [*a.ratios, *a.random_ratios], a.candidates_factor)
        if self.stages.done(stage.name, key) is None:
            log.info("stage candidates: %d guided tiles (%s)", sum(counts.values()),
                     ", ".join(f"{self.classes[c]} {n}" for c, n in counts.items()))
            for name in self.classes:
                shutil.rmtree(where / name, ignore_errors=True)  # stale tiles of another config
            where.mkdir(parents=True, exist_ok=True)
            started = time.perf_counter()
            dev, decoder = self.device, finetuned_autoencoder
            records = generate_candidates(cfg, unet.to(dev), scheduler, latent_clf.to(dev), decoder.to(dev), scale,
                                          counts, self.classes, where)
            unet.cpu(), latent_clf.cpu(), decoder.cpu()
            (where / "candidates.json").write_text(json.dumps(records, indent=1))
            self.stages.mark(stage.name, key, count=len(records), seconds=time.perf_counter() - started)
        records = json.loads((where / "candidates.json").read_text())
        cand_index = TileIndex(root=where.resolve(), entries=[(r["path"], r["label"]) for r in records],
                               classes=self.classes, skipped=[])
        return {"records": records, "cand": TileFolder(cand_index, TileOptions(self.size))}

    # ------------------------------------------------------------------------------- stage 5

    def scores(self, stage: Stage, baseline, baseline_size: int, cand: TileFolder, records: list[dict]) -> dict[str, Any]:
        from histodiff.selection.candidate_features import score_all

        where, key = self.out / "selection" / "scores.pt", self.keys[stage.name]
        if self.stages.done(stage.name, key) is None or not where.is_file():
            target = torch.as_tensor([r["label"] for r in records], dtype=torch.long)
            scores = score_all(baseline, baseline_size, self.inp.labeled, self.inp.train_idx, cand, target,
                               self.inception, self.K, self.bs, self.device)
            baseline.cpu(), self.inception.cpu()
            where.parent.mkdir(parents=True, exist_ok=True)
            torch.save(scores, where)
            self.stages.mark(stage.name, key)
        return {"scores": torch.load(where, weights_only=True)}

    def selection(self, stage: Stage, scores: dict[str, torch.Tensor], records: list[dict]) -> dict[str, Any]:
        from histodiff.evaluation.fid import fid_report
        from histodiff.selection.augment_sets import make_selections, write_manifest

        cfg, a = self.cfg, self.cfg.augment
        selections = make_selections(cfg, scores, self.train_counts, self.classes)
        write_manifest(self.out / "synthetic" / "manifest.csv", records, scores, selections, self.classes, cfg)
        real_inc, real_y = scores["real_inception"], scores["real_labels"]
        fake_inc, fake_y = scores["fake_inception"], scores["target"]
        self.results["fid_all_candidates"] = fid_report(real_inc, real_y, fake_inc, fake_y, self.classes)
        fid = {}
        for sel in selections:
            idx = torch.as_tensor(sel.indices, dtype=torch.long)
            fid[sel.name] = fid_report(real_inc, real_y, fake_inc[idx], fake_y[idx], self.classes)
            if not sel.met:
                log.warning("%s: quotas not met, short by %s (raise augment.candidates_factor or lower augment.tau)",
                            sel.name, {self.classes[c]: n for c, n in sel.shortfall.items() if n})
        self.results["selection"] = {"tau": a.tau, "feature_threshold": a.feature_threshold,
                                     "pixel_threshold": a.pixel_threshold, "candidates": len(records)}
        return {"selections": selections, "fid": fid}

    # ------------------------------------------------------------------------------- stage 6

    def train_downstream(self, stage: Stage, setting: str, seed: int, synthetic: list[int], cand: TileFolder | None,
                         save_to: Path | None = None) -> dict:
        """One downstream classifier; its marker key is its tiles (paths), its seed and its stage's config."""
        from histodiff.evaluation.downstream import evaluate, predict
        from histodiff.evaluation.trained_classifiers import save_classifier, train_site_classifier

        cfg = self.cfg
        paths = sorted(cand.index.entries[i][0] for i in synthetic) if cand is not None else []
        name = f"downstream/{setting}/seed{seed}"
        key = digest(self.base, self._config(stage), seed, paths, self.keys["candidates"] if paths else None)
        rec = self.stages.done(name, key)
        if rec is None or (save_to is not None and not (save_to / "model.safetensors").is_file()):
            parts = [self.train_aug]
            if synthetic:
                parts.append(TileFolder(cand.index, TileOptions(self.size, augment=True), subset=synthetic))
            log.info("stage %s: training %s on %d real + %d synthetic tiles", name, cfg.downstream.model,
                     len(self.train_aug), len(synthetic))
            trained = train_site_classifier(cfg, cfg.downstream, ConcatDataset(parts), self.val, self.K, seed,
                                            f"{setting} seed {seed}")
            logits, _, labels = predict(trained.model, self.inp.test, trained.img_size, self.bs, self.device)
            trained.model.cpu()
            metrics = evaluate(logits, labels, self.K, self.classes)  # the test set, once
            metrics["best_val_accuracy"] = trained.best_val_accuracy
            (self.out / name).mkdir(parents=True, exist_ok=True)
            (self.out / name / "metrics.json").write_text(json.dumps(metrics, indent=1))
            if save_to is not None:
                save_classifier(save_to, trained, cfg.downstream, self.classes, setting=setting, seed=seed)
            rec = self.stages.mark(name, key, metrics=metrics)
            log.info("%s: test accuracy %.3f, F1 %.3f", name, metrics["accuracy"], metrics["f1"])
        return rec["metrics"]

    def baseline(self, stage: Stage) -> dict[str, Any]:
        from histodiff.evaluation.trained_classifiers import load_classifier

        seeds, where = self.cfg.augment.seeds, self.out / "baseline_classifier"
        seeds_metrics = {str(s): self.train_downstream(stage, "baseline", s, [], None, where if s == seeds[0] else None)
                               for s in seeds}
        model, meta = load_classifier(where)
        return {"baseline": model, "baseline_size": meta["img_size"], "baseline_seeds": seeds_metrics}

    def downstream(self, stage: Stage, selections, fid: dict, baseline_seeds: dict, cand: TileFolder) -> dict[str, Any]:
        settings: dict[str, dict] = {"baseline": {"seeds": baseline_seeds, "n_synthetic": 0, "fid": None, "kid": None}}
        for sel in selections:
            report = fid[sel.name]
            entry = {"seeds": {}, "n_synthetic": len(sel.indices), "fid": report["fid"], "kid": report["kid"],
                     "fid_report": report, "quota_met": sel.met, "memorised_dropped": sel.memorised,
                     "shortfall": {self.classes[c]: n for c, n in sel.shortfall.items() if n}}
            for s in self.cfg.augment.seeds:
                entry["seeds"][str(s)] = self.train_downstream(stage, sel.name, s, sel.indices, cand)
            settings[sel.name] = entry
        self.results["settings"] = settings
        return {"settings": settings}

    def report(self, stage: Stage, settings: dict, cand: TileFolder, selections) -> dict[str, Any]:
        from histodiff.evaluation.table1 import class_grids, confusion_png, row_label, table_rows, write_tables

        rows = table_rows(self.results)
        write_tables(rows, self.out, len(self.cfg.augment.seeds) > 1)
        self.results["table"] = rows
        for name, entry in settings.items():
            total = torch.stack([torch.as_tensor(m["confusion"]) for m in entry["seeds"].values()]).sum(0).tolist()
            confusion_png(total, self.classes, f"{row_label(name)} (test, seeds {','.join(entry['seeds'])})",
                          self.out / "confusion" / f"{name}.png")
        class_grids(self.inp.labeled, cand, selections, self.classes, self.cfg.augment.grid_tiles, self.size,
                    self.out / "grids")
        return {}


def run_augment(cfg, data: str | Path, test: str | Path, model_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Run (or resume) the labeled-site pipeline; returns the results (also written to ``out_dir/results.json``).

    Inputs are checked before any heavy work: classes, split sizes, the model folder and its profile.
    """
    from histodiff.local_training.trainer_setup import quiet_libraries

    quiet_libraries()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return Pipeline(cfg, Path(data), Path(test), Path(model_dir), out).run()
