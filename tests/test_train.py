import numpy as np
import torch

from cgd import models
from cgd.tensors import accuracy
from cgd.train import TrainConfig, train

CFG = TrainConfig(epochs=3, batch_size=64, lr=0.2, snapshot_epoch=2, seed=0)


def small():
    torch.manual_seed(0)
    return models.get("fastnet", num_classes=4, widths=(16, 32, 32), stem=16)


def test_learns_tiny_data_and_records_losses(tiny):
    r = train(small(), tiny.train.images, tiny.train.labels, CFG)
    assert accuracy(r.model, tiny.test.images, tiny.test.labels) > 0.9
    assert r.loss_history.shape == (3, len(tiny.train)) and np.isfinite(r.loss_history).all()
    assert r.loss_history[2].mean() < r.loss_history[0].mean()
    assert r.snapshot is not None and len(r.epoch_seconds) == 3


def test_deterministic_and_resumes_bit_for_bit(tiny, tmp_path):
    full = train(small(), tiny.train.images, tiny.train.labels, CFG)
    again = train(small(), tiny.train.images, tiny.train.labels, CFG)
    for a, b in zip(full.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)

    calls = []

    class Stop(Exception):
        pass

    def interrupt(epoch, model):
        calls.append(epoch)
        if epoch == 2:
            raise Stop

    try:
        train(small(), tiny.train.images, tiny.train.labels, CFG, checkpoint_dir=tmp_path, on_epoch=interrupt)
    except Stop:
        pass
    resumed = train(small(), tiny.train.images, tiny.train.labels, CFG, checkpoint_dir=tmp_path,
                    on_epoch=lambda e, m: calls.append(e))
    assert calls == [1, 2, 3]  # epochs 1-2 ran, then only epoch 3 on the rerun
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)
    assert np.allclose(full.loss_history, resumed.loss_history, atol=1e-6)


def test_safetensors_round_trip(tmp_path):
    m = small()
    models.save_model(m, tmp_path / "m.safetensors")
    back = models.load_model(tmp_path / "m.safetensors")
    x = torch.randn(2, 3, 16, 16)
    m.eval()
    assert torch.allclose(m(x), back(x))
