"""The residual-ViT and LoRA benchmark scripts at tiny sizes: they run and write the JSON they promise.

The scripts (benchmarks/, on the path through conftest) and the libraries they import (timm,
peft, transformers) are imported by the tests, not when the module is collected: only a process
that runs these slow tests pays for them."""

import json

import pytest


@pytest.mark.slow
def test_residual_vit_script_writes_step_ratios_and_accuracies(tmp_path, capsys):
    pytest.importorskip("timm")
    import residual_vit

    out = tmp_path / "vit.json"
    assert residual_vit.main(["--rates", "0.5", "--batch", "4", "--img", "8", "--patch", "4", "--dim", "16",
                              "--depth", "2", "--heads", "2", "--repeats", "1", "--acc-seeds", "0",
                              "--acc-steps", "2", "--acc-batch", "8", "--acc-dim", "16", "--acc-depth", "1",
                              "--acc-heads", "2", "--acc-train", "100", "--acc-test", "50", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    (row,) = result["steps"]
    assert row["rate"] == 0.5 and set(row["seconds"]) == {"timm", "dropkit", "no_drop"}
    assert row["dropkit_over_timm"] > 0 and len(row["load_average_1min"]) == 2
    accuracy = result["accuracy"]
    assert set(accuracy["accuracy"]) == {"timm", "dropkit"} and accuracy["test_images"] == 50
    assert all(0.0 <= a <= 1.0 for runs in accuracy["accuracy"].values() for a in runs)


@pytest.mark.slow
def test_lora_script_measures_saved_bytes_and_step_time(tmp_path, capsys):
    pytest.importorskip("peft")
    import lora_step

    out = tmp_path / "lora.json"
    assert lora_step.main(["--hidden", "32", "--intermediate", "48", "--layers", "1", "--heads", "4",
                           "--kv-heads", "2", "--vocab", "64", "--batch", "2", "--seq", "8", "--rank", "4",
                           "--repeats", "1", "--cpu-time", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    capsys.readouterr()
    memory = result["memory"]
    assert memory["dropkit"]["lora_layers"] == 7
    # the converted adapters keep one 8-byte seed each more than lora_dropout=0, and PEFT's dropout
    # keeps at least one dropped copy of every LoRA layer's input more
    assert memory["dropkit"]["saved_bytes"] == memory["dropout0"]["saved_bytes"] + 8 * 7
    assert result["peft_minus_dropkit_per_lora_layer_in_activations"] >= 1.0
    assert set(result["seconds"]) == set(result["cpu_seconds"]) == {"dropout0", "peft", "dropkit"}
