"""train.loggers wandb / mlflow: the run's config as hyperparameters, one point per step record, a resume continuing
the same tracker run, a missing package named in one line. The trackers are stand-ins with the packages' API
(wandb.init / Run.log / Run.finish; mlflow.start_run / log_params / log_metrics / end_run): no network, no server."""

import sys
import types

import pytest

from mimkit.extras import MissingExtra
from mimkit.metrics import MetricsLog, flat_params


class Calls(list):
    def names(self):
        return [c[0] for c in self]


@pytest.fixture
def fake_wandb(monkeypatch):
    calls = Calls()

    class Run:
        def __init__(self, id):
            self.id = id

        def log(self, values, step):
            calls.append(("log", dict(values), step))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run(kwargs["id"] or "run-1")

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    return calls


@pytest.fixture
def fake_mlflow(monkeypatch):
    calls = Calls()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def start_run(run_id=None, run_name=None):
        calls.append(("start_run", run_id, run_name))
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id=run_id or "ml-1"))

    module = types.SimpleNamespace(
        set_tracking_uri=lambda uri: calls.append(("uri", uri)),
        start_run=start_run,
        log_params=lambda p: calls.append(("params", dict(p))),
        log_metrics=lambda m, step: calls.append(("metrics", dict(m), step)),
        end_run=lambda: calls.append(("end",)),
    )
    monkeypatch.setitem(sys.modules, "mlflow", module)
    return calls


CONFIG = {"method": "mae", "optim": {"blr": 1e-3, "betas": [0.9, 0.95]}, "train": {"epochs": 2}}


def test_wandb_gets_the_config_every_step_record_and_resumes_the_same_run(fake_wandb, tmp_path):
    log = MetricsLog(tmp_path, True, ("wandb",), config=CONFIG)
    log.write({"step": 1, "loss": 2.0, "lr": 0.1, "time": 123.0})
    log.write({"event": "resume", "from": "x"})  # no step: not a point
    log.write({"step": 2, "loss": 1.5, "knn": {"block1": 30.0}})
    log.close()
    init = fake_wandb[0][1]
    assert init["config"] == {"method": "mae", "optim.blr": 1e-3, "optim.betas": "[0.9, 0.95]", "train.epochs": 2}
    assert init["id"] is None and init["name"] == tmp_path.name and init["resume"] == "allow"
    assert fake_wandb[1:] == [
        ("log", {"pretrain/loss": 2.0, "pretrain/lr": 0.1}, 1),
        ("log", {"pretrain/loss": 1.5, "pretrain/knn/block1": 30.0}, 2),
        ("finish",),
    ]
    assert (tmp_path / ".wandb_run_id").read_text().strip() == "run-1"
    fake_wandb.clear()
    MetricsLog(tmp_path, True, ("wandb",), config=CONFIG, resumed_step=2).close()  # a resume: the same W&B run
    assert fake_wandb[0][1]["id"] == "run-1"


def test_mlflow_logs_params_once_metrics_per_step_into_the_run_folder(fake_mlflow, tmp_path):
    log = MetricsLog(tmp_path, True, ("mlflow",), prefix="linprobe", config=CONFIG)
    log.write({"step": 3, "loss": 0.5})
    log.close()
    assert fake_mlflow[0] == ("uri", (tmp_path / "mlruns").resolve().as_uri())
    assert fake_mlflow[1] == ("start_run", None, tmp_path.name)
    assert fake_mlflow[2] == ("params", flat_params(CONFIG))
    assert fake_mlflow[3:] == [("metrics", {"linprobe/loss": 0.5}, 3), ("end",)]
    fake_mlflow.clear()
    MetricsLog(tmp_path, True, ("mlflow",), config=CONFIG).close()
    assert ("start_run", "ml-1", None) in fake_mlflow and "params" not in fake_mlflow.names()


def test_only_rank_0_tracks_and_a_missing_package_is_one_line(tmp_path, monkeypatch):
    MetricsLog(tmp_path, False, ("wandb", "mlflow"), config=CONFIG).close()  # other ranks: nothing imported
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(
        MissingExtra,
        match=r"^train.loggers: wandb needs wandb, which is not installed: pip install "
        r"'mimkit\[wandb\]'",
    ):
        MetricsLog(tmp_path, True, ("wandb",), config=CONFIG)


def test_the_real_packages_offline(tmp_path, monkeypatch):
    """W&B in offline mode and MLflow's local store, as a user without a server has them: the same run continued on
    a resume, the config as parameters, every step's loss."""
    import mlflow

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    out.mkdir()
    log = MetricsLog(out, True, ("wandb", "mlflow"), config=CONFIG)
    log.write({"step": 1, "loss": 2.0})
    log.write({"step": 2, "loss": 1.0})
    log.close()
    resumed = MetricsLog(out, True, ("wandb", "mlflow"), config=CONFIG, resumed_step=2)
    resumed.write({"step": 3, "loss": 0.5})
    resumed.close()
    run_id = (out / ".mlflow_run_id").read_text().strip()
    assert mlflow.get_run(run_id).data.params == {k: str(v) for k, v in flat_params(CONFIG).items()}
    history = mlflow.tracking.MlflowClient().get_metric_history(run_id, "pretrain/loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.0), (3, 0.5)]
    wandb_id = (out / ".wandb_run_id").read_text().strip()
    offline = sorted(p.name for p in (out / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(name.endswith(wandb_id) for name in offline)


def test_pretraining_sends_its_resolved_config(fake_wandb, tiny_cfg):
    from mimkit.train import pretrain

    pretrain(tiny_cfg("train.loggers=[wandb]", "train.max_steps=2"))
    init = fake_wandb[0][1]
    assert (
        init["config"]["method"] == "mae"
        and init["config"]["model.depth"] == 2
        and "simmim.mask_patch_size" not in init["config"]
    )
    assert [c[2] for c in fake_wandb if c[0] == "log"] == [1, 2] and fake_wandb[-1] == ("finish",)
