"""The whole labeled-site pipeline, stage by stage, each skipped on a rerun when its inputs and config match."""

from __future__ import annotations

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
    def __init__(self, cfg, data: Path, test: Path, model_dir: Path, out: Path) -> None:
        self.cfg, self.out, self.model_dir = cfg, out, model_dir
        self.inp = load_inputs(cfg, data, test, model_dir, out / "work")
        self.inception = _check_weights(cfg)
        self.classes, self.K = self.inp.classes, len(self.inp.classes)
        self.size, self.bs = cfg.tiles.image_size, cfg.tiles.batch_size
        # inference (sampling, encoding, features) on the training accelerator when it is a GPU
        self.device = torch.device("cuda" if on_gpu(cfg.train) else "cpu")
        self.stages = Stages(out)
        entries = self.inp.labeled.index.entries
        self.train_counts = {c: 0 for c in range(self.K)}
        for i in self.inp.train_idx:
            self.train_counts[entries[i][1]] += 1
        self.train_aug = _tiles(self.inp, self.size, self.inp.train_idx, True)
        self.train_plain = _tiles(self.inp, self.size, self.inp.train_idx, False)
        self.val = _tiles(self.inp, self.size, self.inp.val_idx, False)
        a = cfg.augment
        self.base = digest(_fingerprint(self.inp.labeled), _fingerprint(self.inp.test), self.size, cfg.seed,
                           a.val_fraction, a.min_val_per_class)
        self.model_fp = _model_fingerprint(model_dir)
        self.results: dict[str, Any] = {
            "classes": self.classes, "profile": cfg.profile, "image_size": self.size, "seed": cfg.seed,
            "seeds": list(a.seeds), "tiles": {"train": len(self.inp.train_idx), "val": len(self.inp.val_idx),
                                               "test": len(self.inp.test)},
            "train_counts": {self.classes[c]: n for c, n in self.train_counts.items()},
        }

    # ----------------------------------------------------------------------------------- stage 3

    def aux_classifier(self) -> tuple[torch.nn.Module, int]:
        from histodiff.evaluation.trained_classifiers import load_classifier, save_classifier, train_site_classifier

        cfg, where = self.cfg, self.out / "aux_classifier"
        self.key_aux = digest(self.base, cfg.aux_classifier, self.bs)
        rec = self.stages.done("aux_classifier", self.key_aux)
        if rec is None:
            log.info("stage aux_classifier: training phi (%s) on %d real tiles", cfg.aux_classifier.model, len(self.train_aug))
            trained = train_site_classifier(cfg, cfg.aux_classifier, self.train_aug, self.val, self.K, cfg.seed, "aux phi")
            save_classifier(where, trained, cfg.aux_classifier, self.classes)
            rec = self.stages.mark("aux_classifier", self.key_aux, best_val_accuracy=trained.best_val_accuracy)
        self.results["aux_classifier"] = {"val_accuracy": rec["best_val_accuracy"], "path": str(where)}
        phi, meta = load_classifier(where)
        return phi, meta["img_size"]

    def decoder(self, autoencoder, phi, phi_size: int):
        from diffusers import AutoencoderKL

        from histodiff.model_files import save_pretrained_atomic
        from histodiff.finetune.decoder_finetune import finetune_decoder, phi_on_reconstructions

        cfg, a, where = self.cfg, self.cfg.augment, self.out / "decoder"
        self.key_dec = digest(self.key_aux, self.model_fp, a.lambda_ce, a.decoder_steps, a.decoder_lr,
                              cfg.lae.perceptual_weight, cfg.weights.perceptual, self.bs)
        rec = self.stages.done("decoder", self.key_dec)
        if rec is None:
            log.info("stage decoder: fine-tuning D for %d steps (lambda_CE %.3g)", a.decoder_steps, a.lambda_ce)
            before = phi_on_reconstructions(autoencoder, phi, phi_size, self.val, self.bs, self.device)
            losses = finetune_decoder(cfg, autoencoder, phi, phi_size, self.train_aug) if a.decoder_steps > 0 else {}
            after = phi_on_reconstructions(autoencoder.to(self.device), phi, phi_size, self.val, self.bs,
                                           self.device)
            save_pretrained_atomic(autoencoder.cpu(), where)
            rec = self.stages.mark("decoder", self.key_dec, val_before=before, val_after=after, train_losses=losses)
        self.results["decoder"] = {"path": str(where), "val_before": rec["val_before"], "val_after": rec["val_after"],
                                   "train_losses": rec["train_losses"]}
        return AutoencoderKL.from_pretrained(str(where)).eval().requires_grad_(False)

    # ----------------------------------------------------------------------------------- stage 4

    def latent_classifier(self, autoencoder, scale: float, alphas: torch.Tensor):
        from histodiff.model_files import save_pretrained_atomic
        from histodiff.guidance.latent_classifier_training import accuracy_by_timestep, encode_latents, train_latent_classifier
        from histodiff.guidance.latent_classifier_net import TimeLatentClassifier, build_latent_classifier

        cfg, where = self.cfg, self.out / "latent_classifier"
        # E is frozen in fine-tuning, so these latents equal the DM's training latents
        self.key_lc = digest(self.base, self.model_fp, cfg.latent_classifier, cfg.augment.latent_eval_timesteps,
                             alphas.sum().item(), self.bs)
        rec = self.stages.done("latent_classifier", self.key_lc)
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
            rec = self.stages.mark("latent_classifier", self.key_lc, final_loss=loss,
                                   val_accuracy_by_t={str(t): v for t, v in acc.items()}, val_latents=len(z_va))
        self.results["latent_classifier"] = {"path": str(where), "final_loss": rec["final_loss"],
                                             "val_accuracy_by_t": rec["val_accuracy_by_t"]}
        return TimeLatentClassifier.from_pretrained(str(where)).eval().requires_grad_(False)

    def candidates(self, unet, scheduler, latent_clf, autoencoder, scale: float) -> list[dict]:
        from histodiff.guidance.candidates import candidate_counts, generate_candidates

        cfg, a, where = self.cfg, self.cfg.augment, self.out / "synthetic"
        counts = candidate_counts(self.train_counts, [*a.ratios, *a.random_ratios], a.candidates_factor)
        dm = cfg.dm
        self.key_cand = digest(self.key_dec, self.key_lc, self.model_fp, dm.ddim_steps, dm.eta, dm.guidance_scale,
                               counts, cfg.seed)
        if self.stages.done("candidates", self.key_cand) is None:
            log.info("stage candidates: %d guided tiles (%s)", sum(counts.values()),
                     ", ".join(f"{self.classes[c]} {n}" for c, n in counts.items()))
            for name in self.classes:
                shutil.rmtree(where / name, ignore_errors=True)  # stale tiles of another config
            where.mkdir(parents=True, exist_ok=True)
            started = time.perf_counter()
            dev = self.device
            records = generate_candidates(cfg, unet.to(dev), scheduler, latent_clf.to(dev), autoencoder.to(dev), scale,
                                          counts, self.classes, where)
            unet.cpu(), latent_clf.cpu(), autoencoder.cpu()
            (where / "candidates.json").write_text(json.dumps(records, indent=1))
            self.stages.mark("candidates", self.key_cand, count=len(records), seconds=time.perf_counter() - started)
        return json.loads((where / "candidates.json").read_text())

    # ----------------------------------------------------------------------------------- stage 5

    def train_downstream(self, setting: str, seed: int, synthetic: list[int], cand: TileFolder | None,
                         save_to: Path | None = None) -> dict:
        from histodiff.evaluation.downstream import evaluate, predict
        from histodiff.evaluation.trained_classifiers import save_classifier, train_site_classifier

        cfg = self.cfg
        paths = sorted(cand.index.entries[i][0] for i in synthetic) if cand is not None else []
        name = f"downstream/{setting}/seed{seed}"
        key = digest(self.base, cfg.downstream, self.bs, seed, paths, self.key_cand if paths else None)
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

    def score(self, baseline, baseline_size: int, cand: TileFolder, records: list[dict]) -> dict[str, torch.Tensor]:
        from histodiff.selection.candidate_features import score_all

        cfg, where = self.cfg, self.out / "selection" / "scores.pt"
        key = digest(self.key_cand, self.key_base0, cfg.weights.inception, cfg.weights.inception_path)
        if self.stages.done("scores", key) is None or not where.is_file():
            target = torch.as_tensor([r["label"] for r in records], dtype=torch.long)
            scores = score_all(baseline, baseline_size, self.inp.labeled, self.inp.train_idx, cand, target,
                               self.inception, self.K, self.bs, self.device)
            baseline.cpu(), self.inception.cpu()
            where.parent.mkdir(parents=True, exist_ok=True)
            torch.save(scores, where)
            self.stages.mark("scores", key)
        return torch.load(where, weights_only=True)

    def run(self) -> dict[str, Any]:
        from histodiff.model_files import load_global_model
        from histodiff.diffusion.noise_schedule import build_ddim
        from histodiff.evaluation.fid import fid_report
        from histodiff.evaluation.trained_classifiers import load_classifier
        from histodiff.evaluation.table1 import confusion_png, row_label, table_rows, write_tables
        from histodiff.selection.augment_sets import make_selections, write_manifest

        cfg, a, out = self.cfg, self.cfg.augment, self.out
        started = time.perf_counter()
        autoencoder, unet, info = load_global_model(self.model_dir, cfg)
        scale = float(info["scale_factor"])
        scheduler = build_ddim(cfg.dm)
        alphas = scheduler.alphas_cumprod.clone()

        phi, phi_size = self.aux_classifier()
        autoencoder = self.decoder(autoencoder, phi, phi_size)
        latent_clf = self.latent_classifier(autoencoder, scale, alphas)

        settings: dict[str, dict] = {"baseline": {"seeds": {}, "n_synthetic": 0, "fid": None, "kid": None}}
        base_dir = out / "baseline_classifier"
        seed0 = a.seeds[0]
        for s in a.seeds:
            metrics = self.train_downstream("baseline", s, [], None, base_dir if s == seed0 else None)
            settings["baseline"]["seeds"][str(s)] = metrics
        self.key_base0 = digest(self.base, cfg.downstream, self.bs, seed0)
        baseline, meta = load_classifier(base_dir)

        records = self.candidates(unet, scheduler, latent_clf, autoencoder, scale)
        cand_index = TileIndex(root=(out / "synthetic").resolve(), entries=[(r["path"], r["label"]) for r in records],
                               classes=self.classes, skipped=[])
        cand = TileFolder(cand_index, TileOptions(self.size))
        scores = self.score(baseline, meta["img_size"], cand, records)
        selections = make_selections(cfg, scores, self.train_counts, self.classes)
        write_manifest(out / "synthetic" / "manifest.csv", records, scores, selections, self.classes, cfg)

        real_inc, real_y = scores["real_inception"], scores["real_labels"]
        fake_inc, fake_y = scores["fake_inception"], scores["target"]
        self.results["fid_all_candidates"] = fid_report(real_inc, real_y, fake_inc, fake_y, self.classes)
        for sel in selections:
            idx = torch.as_tensor(sel.indices, dtype=torch.long)
            report = fid_report(real_inc, real_y, fake_inc[idx], fake_y[idx], self.classes)
            entry = {"seeds": {}, "n_synthetic": len(sel.indices), "fid": report["fid"], "kid": report["kid"],
                     "fid_report": report, "quota_met": sel.met, "memorised_dropped": sel.memorised,
                     "shortfall": {self.classes[c]: n for c, n in sel.shortfall.items() if n}}
            if not sel.met:
                log.warning("%s: quotas not met, short by %s (raise augment.candidates_factor or lower augment.tau)",
                            sel.name, entry["shortfall"])
            for s in a.seeds:
                entry["seeds"][str(s)] = self.train_downstream(sel.name, s, sel.indices, cand)
            settings[sel.name] = entry
        self.results["settings"] = settings
        self.results["selection"] = {"tau": a.tau, "feature_threshold": a.feature_threshold,
                                     "pixel_threshold": a.pixel_threshold, "candidates": len(records)}

        rows = table_rows(self.results)
        write_tables(rows, out, len(a.seeds) > 1)
        self.results["table"] = rows
        for name, entry in settings.items():
            total = torch.stack([torch.as_tensor(m["confusion"]) for m in entry["seeds"].values()]).sum(0).tolist()
            confusion_png(total, self.classes, f"{row_label(name)} (test, seeds {','.join(entry['seeds'])})",
                          out / "confusion" / f"{name}.png")
        self._grids(cand, selections)
        self.results["stages"] = {"ran": self.stages.ran, "skipped": self.stages.skipped}
        self.results["seconds"] = time.perf_counter() - started
        (out / "results.json").write_text(json.dumps(self.results, indent=1, default=str))
        log.info("done: %s, %s", out / "table1.md", out / "results.json")
        return self.results

    def _grids(self, cand: TileFolder, selections) -> None:
        from histodiff.evaluation.table1 import class_grid

        n = self.cfg.augment.grid_tiles
        shown = max(selections, key=lambda s: len(s.indices)).indices if selections else []
        entries = self.inp.labeled.index.entries
        for c, name in enumerate(self.classes):
            real = [self.inp.labeled[i][0] for i in [i for i, e in enumerate(entries) if e[1] == c][:n]]
            picks = [i for i in shown if cand.index.entries[i][1] == c] or \
                    [i for i in range(len(cand)) if cand.index.entries[i][1] == c]
            syn = [cand[i][0] for i in picks[:n]]
            empty = torch.empty(0, 3, self.size, self.size)
            class_grid(torch.stack(real) if real else empty, torch.stack(syn) if syn else empty, n,
                       self.out / "grids" / f"{name}.png")


def run_augment(cfg, data: str | Path, test: str | Path, model_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Run (or resume) the labeled-site pipeline; returns the results (also written to ``out_dir/results.json``).

    Inputs are checked before any heavy work: classes, split sizes, the model folder and its profile.
    """
    from histodiff.local_training.trainer_setup import quiet_libraries

    quiet_libraries()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return Pipeline(cfg, Path(data), Path(test), Path(model_dir), out).run()
