"""``dropkit uncertainty`` on a tiny run trained on generated IDX data, with generated OOD data."""

import json

import numpy as np
import pytest
import torch

from dropkit import mc, rng
from dropkit.lab.cli import main
from dropkit.lab.train import CHECKPOINT, TrainConfig, train
from dropkit.lab.uncertainty import _CHUNK_STREAM, evaluate_uncertainty, load_run
from conftest import write_idx, write_idx_folder


def _bright_folder(folder, n=30):
    """Out-of-distribution images: every pixel near white, unlike the training noise."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)
    for stem, count in (("train", n), ("t10k", n)):
        write_idx(folder / f"{stem}-images-idx3-ubyte.gz", rng.integers(230, 256, (count, 28, 28), dtype=np.uint8))
        write_idx(folder / f"{stem}-labels-idx1-ubyte.gz", rng.integers(0, 10, count, dtype=np.uint8))
    return folder


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("unc")
    data = write_idx_folder(root / "data", n_train=120, n_test=40)
    config = TrainConfig(model="tutorial_mlp", model_kwargs={"hidden": 16}, p=0.3, epochs=1, batch_size=32,
                         val_size=20, dataset="fake", data_dir=str(data))
    train(config, root / "run", quiet=True)
    return root


def test_cli_writes_json_and_html(tiny_run, capsys):
    out = tiny_run / "report"
    code = main(["uncertainty", str(tiny_run / "run"), "--samples", "12", "--ood-dir", str(_bright_folder(tiny_run / "ood")),
                 "--out", str(out)])
    assert code == 0
    result = json.loads((out / "uncertainty.json").read_text())
    for way in ("deterministic", "mc"):
        assert set(result[way]) == {"accuracy", "nll", "brier", "ece", "auroc", "aupr"}
        assert 0 <= result[way]["accuracy"] <= 1 and result[way]["nll"] > 0 and 0 <= result[way]["ece"] <= 1
        assert all(0 <= v <= 1 for v in result[way]["auroc"].values())
    assert set(result["mc"]["auroc"]) == {"total_entropy", "mutual_information", "max_probability"}
    assert set(result["deterministic"]["auroc"]) == {"total_entropy", "max_probability"}
    assert list(result["levels"]) == ["1", "10", "12"] and result["levels"]["12"] == {
        k: result["mc"][k] for k in ("accuracy", "nll", "brier", "ece")}
    assert result["test_size"] == 40 and result["ood"]["size"] == 30
    assert len(result["reliability"]["mc"]["counts"]) == 15 and sum(result["reliability"]["mc"]["counts"]) == 40
    page = (out / "uncertainty.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "AUROC" in page
    assert "MC T=12" in capsys.readouterr().out
    assert main(["uncertainty", str(tiny_run / "run"), "--samples", "2", "--limit", "7", "--ood-dir",
                 str(tiny_run / "ood"), "--out", str(out)]) == 0
    limited = json.loads((out / "uncertainty.json").read_text())
    assert limited["test_size"] == 7 and limited["ood"]["size"] == 7


def test_figures_match_a_direct_computation_and_repeat(tiny_run):
    result = evaluate_uncertainty(tiny_run / "run", samples=5, seed=3)
    again = evaluate_uncertainty(tiny_run / "run", samples=5, seed=3)
    assert {k: result[k] for k in ("deterministic", "mc")} == {k: again[k] for k in ("deterministic", "mc")}
    assert "ood" not in result and "auroc" not in result["mc"]
    config, model = load_run(tiny_run / "run")
    from dropkit.lab.train import load_splits
    test = load_splits(config.dataset, config.data_dir, config.val_size, config.limit_train, config.limit_test,
                       config.inputs)[2]
    with torch.no_grad():
        probs = model(test.images).softmax(-1)
    expected_nll = float(-probs.gather(1, test.labels[:, None]).log().mean())
    assert result["deterministic"]["nll"] == pytest.approx(expected_nll, rel=1e-5)
    assert result["deterministic"]["accuracy"] == pytest.approx(float((probs.argmax(1) == test.labels).float().mean()))



def test_shared_masks_give_the_thinned_passes(tiny_run):
    result = evaluate_uncertainty(tiny_run / "run", samples=6, seed=3, shared_masks=True)
    assert result["shared_masks"] is True
    config, model = load_run(tiny_run / "run")
    from dropkit.lab.train import load_splits
    test = load_splits(config.dataset, config.data_dir, config.val_size, config.limit_train, config.limit_test,
                       config.inputs)[2]
    passes = mc.mc_samples(model, test.images, 6, seed=rng.derive_seed(3, _CHUNK_STREAM, 0), shared_masks=True)
    probs = passes.float().softmax(-1).mean(0)
    expected_nll = float(-probs.gather(1, test.labels[:, None]).log().mean())
    assert result["mc"]["nll"] == pytest.approx(expected_nll, rel=1e-5)
    assert result["mc"] != evaluate_uncertainty(tiny_run / "run", samples=6, seed=3)["mc"]

def test_bad_run_folders(tmp_path, tiny_run, capsys):
    assert main(["uncertainty", str(tmp_path), "--samples", "2"]) == 2
    assert "config.json not found" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_run / "run" / "config.json").read_text())
    (broken / CHECKPOINT).write_bytes(b"not a checkpoint")
    assert main(["uncertainty", str(broken), "--samples", "2"]) == 2
    assert f"{broken / CHECKPOINT}: cannot load" in capsys.readouterr().err
    (broken / "config.json").write_text("{")
    assert main(["uncertainty", str(broken), "--samples", "2"]) == 2
    assert "config.json: not a dropkit run config" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["uncertainty", str(tiny_run / "run"), "--samples", "0"])
