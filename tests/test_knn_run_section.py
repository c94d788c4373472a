"""`mimkit knn` writes its run section train.*, as the other commands; run.*, the former name, still works and says
once that it is deprecated."""

import logging

from mimkit.eval.config import load_eval_config

BASE = ["encoder.checkpoint=none", "encoder.arch=vit_tiny_patch4_32", "data.path=x.npz"]


def deprecations(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "run.* is deprecated" in r.getMessage()]


def test_train_keys_need_no_warning_and_run_keys_warn_once(caplog):
    with caplog.at_level(logging.WARNING, logger="mimkit"):
        cfg = load_eval_config("knn", None, [*BASE, "train.out_dir=o", "train.batch_size=7"])
        assert (cfg.train.out_dir, cfg.train.batch_size) == ("o", 7) and not deprecations(caplog)
        cfg = load_eval_config("knn", None, [*BASE, "run.out_dir=old", "run.batch_size=5"])
        assert (cfg.train.out_dir, cfg.train.batch_size) == ("old", 5)
    assert len(deprecations(caplog)) == 1


def test_the_shipped_knn_recipes_use_train(caplog):
    with caplog.at_level(logging.WARNING, logger="mimkit"):
        for name in ("knn_vit_tiny_cifar10", "knn_vit_base_in1k"):
            cfg = load_eval_config("knn", f"configs/eval/{name}.yaml")
            assert cfg.train.out_dir == f"runs/{name}"
    assert not deprecations(caplog)
