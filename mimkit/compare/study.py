"""A study: the plan (mimkit.compare.plan), its pretraining (.pretraining), its scoring (.scoring) and the read-out
written to the study folder (compare.json, compare.md, the plots; the page: mimkit.compare.page)."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

from mimkit.checkpoint import atomic_write_text
from mimkit.compare.budget import CORE_MINUTES, GPU_MINUTES, is_scored_step, measured_core_minutes, step_clock
from mimkit.compare.plan import Baseline, Plan, Run, log, now, pretrained, read_json, write_json
from mimkit.compare.pretraining import Pretraining
from mimkit.compare.readout import markdown, plots, readouts, std_error, summary_sentences, sweep_winners
from mimkit.compare.scoring import Scoring
from mimkit.compare.spec import run_cpu_scale
from mimkit.machine import machine_info


class Study(Plan, Pretraining, Scoring):
    """Plan, pretrain, score, read out."""

    def scores(self, record: dict) -> dict:
        probe = record["linprobe"]
        knn = record.get("knn") or {"top1": probe["knn_top1"], "wall_clock_s": 0.0}  # --knn command / probe
        n, p_knn, p_probe = probe["val_images"], knn["top1"] / 100, probe["top1"] / 100
        return {"knn_top1": p_knn, "knn_se": round(std_error(p_knn, n), 5), "probe_top1": p_probe,
                "probe_se": round(std_error(p_probe, n), 5), "probe_best_top1": probe["best_top1"] / 100,
                "probe_best_block": probe.get("best_block"), "test_images": n, "evaluated_at": probe["evaluated_at"],
                "eval_wall_s": round(knn["wall_clock_s"] + probe["wall_clock_s"], 1)}  # fmt: skip

    def finetune_scores(self, evals: Path, encoder: list[str]) -> dict | None:
        if not (self.args.finetune_epochs and self.done(evals / "finetune.json", encoder, ("finetune",))):
            return None
        r = read_json(evals / "finetune.json")["finetune"]
        return {"finetune_top1": r["top1"] / 100, "test_images": r["val_images"], "epochs": r.get("epochs")}

    def points(self, run: Run, record: dict, per_minute: int, scale: float) -> list[dict]:
        """The run's scored checkpoints: step, epoch, its training minutes and core- (GPU-) minutes (x `per_minute`,
        its threads or GPUs), its scores."""
        clock = step_clock(run.dir / "pretrain" / "metrics.jsonl")
        every, final = record.get("save_every_steps"), record.get("final_step") if record.get("done") else None
        points = []
        for path in sorted(run.evals.glob("step-*.json")):
            step = int(path.stem.split("-")[1])
            if not is_scored_step(step, every, final) or not self.done(path, pretrained(run, step), self.scored):
                continue
            epoch, seconds = clock.get(step, (step / run.steps_per_epoch, None))
            minutes = None if seconds is None else seconds / 60
            key = self.compute_key
            point = {"step": step, "epoch": round(epoch, 4), "train_minutes": minutes and round(minutes, 5),
                     key: minutes and round(minutes * per_minute * scale, 5)}  # fmt: skip
            if scale != 1.0 and minutes:  # in the reference CPU's units; what this CPU's clock said beside it
                point[f"{key}_measured"] = round(minutes * per_minute, 5)
            points.append({**point, **self.scores(read_json(path))})
        return points

    def run_row(self, run: Run) -> dict:
        record = read_json(run.record_path)
        settings = record.get("settings", {})
        threads = settings.get("threads", self.threads)
        per_minute = 1 if self.on_gpu else threads  # a GPU study: one GPU a run
        device = "gpu" if self.on_gpu else "cpu"  # the machines a row names: its GPUs or its CPUs
        machines = sorted({g[device] for g in record.get("segments", []) if g.get(device)})
        scale = 1.0 if self.on_gpu else run_cpu_scale(run.spec.text, machines, self.cpu_scale)
        return {"name": run.spec.text, "sweep_base": run.base, "method": run.spec.method, "family": run.spec.family,
                "recipe": settings.get("recipe"), "overrides": settings.get("overrides"),
                "steps_per_epoch": run.steps_per_epoch, "done": bool(record.get("done")),
                "final_step": record.get("final_step"), "calibration": record.get("calibration"),
                f"{self.compute_key}_spent": measured_core_minutes(run.dir / "pretrain" / "metrics.jsonl", per_minute),
                "train_invocations": len(record.get("segments", [])), "segments": record.get("segments", []),
                "machines": machines, "core_minute_scale": scale, "threads": threads,
                "abandoned_segments": len(record.get("abandoned_segments", [])),
                "checkpoints": self.points(run, record, per_minute, scale), "finetune": self.finetune_scores(
                    run.evals, pretrained(run, record.get("final_step", 0)))}  # fmt: skip

    def baseline_row(self, b: Baseline) -> dict:
        path = b.evals / "step-00000000.json"
        scores = self.scores(read_json(path)) if self.done(path, b.encoder, self.scored) else {}
        return {"name": b.name, "family": b.family, "encoder": b.encoder, **scores,
                "finetune": self.finetune_scores(b.evals, b.encoder)}  # fmt: skip

    def collect(self) -> dict:
        runs = [self.run_row(run) for run in self.runs]
        seen = {cpu for r in runs for cpu in r["machines"]}
        for cpu in sorted(set(self.cpu_scale) - seen):
            log.warning(
                "--cpu-scale %r: no run was pretrained on that CPU (theirs: %s)", cpu, sorted(seen) or "none yet"
            )
        a = self.args
        tokenizer = {k: v for k, v in read_json(self.tokenizer.parent / "stats.json").items() if k != "stamp"}
        study = {"command": sys.argv, "updated": now(), "data_path": " ".join(a.data), "data": asdict(self.info),
                 "img_size": self.img, "patch_size": self.patch, "mean": self.mean, "std": self.std,
                 "threads": self.threads, "budget": {"epochs": a.epochs, "steps": a.steps,
                                                     "core_minutes": a.core_minutes,
                                                     "gpu_minutes": getattr(a, "gpu_minutes", None),
                                                     "max_steps": a.max_steps},
                 "eval_every_epochs": self.eval_every, "finetune_epochs": a.finetune_epochs, "machine": machine_info(),
                 "compute": self.compute_key, "compute_note": GPU_MINUTES if self.on_gpu else CORE_MINUTES,
                 "cpu_scale": self.cpu_scale, "runs": runs, "baselines": [self.baseline_row(b) for b in self.baselines],
                 "readouts": readouts(runs, a.reach, self.compute_key),
                 "tokenizer": tokenizer if self.needs_tokenizer() else None}  # fmt: skip
        if a.sweep:
            study["sweep_winners"] = sweep_winners(runs)
        study["summary"] = summary_sentences(study)
        return study

    def report(self) -> dict:
        study = self.collect()
        write_json(self.out / "compare.json", study)
        atomic_write_text(self.out / "compare.md", markdown(study))
        plots(study, self.out)
        if study.get("sweep_winners"):
            write_json(self.out / "sweep_winners.json", study["sweep_winners"])
        return study
