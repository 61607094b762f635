"""MC dropout in Hugging Face's Trainer.predict: off by default (the loop forces eval), on with the mixin."""

import pytest
import torch
from torch import nn

try:
    import transformers
    from transformers import Trainer  # noqa: F401 - the import that pulls in torchvision where it is installed
except Exception as err:  # noqa: BLE001 - e.g. PyPI's CUDA torchvision beside a CPU-only torch breaks its import
    pytest.skip(f"transformers' Trainer cannot be imported here: {err}", allow_module_level=True)

from dropkit.integrations.huggingface import MCDropoutTrainerMixin  # noqa: E402


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))

    def forward(self, x, labels=None):
        return {"logits": self.body(x)}


class Rows(torch.utils.data.Dataset):
    def __init__(self):
        self.x = torch.randn(8, 4)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i]}


class MCTrainer(MCDropoutTrainerMixin, transformers.Trainer):
    pass


def _trainer(cls, model, tmp_path):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=8, report_to=[],
                                          use_cpu=True)
    return cls(model=model, args=args)


def _two_passes(trainer, data):
    transformers.set_seed(1)
    first = trainer.predict(data).predictions
    transformers.set_seed(2)
    second = trainer.predict(data).predictions
    return first, second


def test_plain_trainer_predicts_with_dropout_off(tmp_path):
    first, second = _two_passes(_trainer(transformers.Trainer, Net(), tmp_path), Rows())
    assert (first == second).all()


def test_mixin_turns_dropout_on_repeatably_and_restores_modes(tmp_path):
    model = Net()
    trainer = _trainer(MCTrainer, model, tmp_path)
    data = Rows()
    first, second = _two_passes(trainer, data)
    assert not (first == second).all()
    transformers.set_seed(1)
    assert (trainer.predict(data).predictions == first).all()
    trainer.mc_dropout = False
    off_first, off_second = _two_passes(trainer, data)
    assert (off_first == off_second).all()
    seen = []
    model.body[1].register_forward_hook(lambda m, *_: seen.append(m.training))
    trainer.mc_dropout = True
    trainer.predict(data)
    assert seen == [False]  # batch norm stays in eval while dropout samples
