"""mixtral_edu.training.train: schedule, losses, determinism, learning, the command line and its errors."""

import json
import math

import pytest
import torch

from mixtral_edu.weights import load_model
from mixtral_edu.config import MixtralConfig
from mixtral_edu.training.corpus import DOMAINS, SPLITS
from mixtral_edu.training.losses import load_balancing_loss
from mixtral_edu.training.train import (TrainConfig, balance_loss, evaluate, layer_load, load_cv, lr_at,
                               main, model_config_from_args, train)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: see conftest.py


def small_cfg(**kw):
    fields = dict(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=4, max_position_embeddings=64)
    fields.update(kw)
    return MixtralConfig.tiny(**fields)


def random_streams(n=2000, vocab=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {d: torch.randint(3, vocab, (n,), generator=g) for d in DOMAINS}


def test_schedule_warms_up_then_follows_a_cosine():
    tc = TrainConfig(steps=110, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, tc) for s in range(tc.steps)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))          # linear warm-up
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))           # then never increases
    assert lrs[60] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, tc) == pytest.approx(1e-4)                    # ends at min_lr_ratio * lr


def test_layer_load_counts_top_k_picks_per_layer():
    logits = torch.tensor([[5.0, 4.0, 0.0, 0.0], [0.0, 4.0, 5.0, 0.0], [5.0, 0.0, 0.0, 4.0]])
    load = layer_load([logits, logits.flip(-1)], top_k=2)
    assert load.shape == (2, 4)
    assert torch.allclose(load[0], torch.tensor([2, 2, 1, 1]) / 6.0)
    assert torch.allclose(load[1], torch.tensor([1, 1, 2, 2]) / 6.0)
    assert load_cv(torch.full((8,), 0.125)).item() == 0.0
    collapsed = torch.tensor([0.5, 0.5, 0, 0, 0, 0, 0, 0])
    assert load_cv(collapsed).item() == pytest.approx(math.sqrt(3.0))


def test_the_logged_load_and_the_losss_counts_are_one_tally():
    # issue 27: the share of top-k picks per expert is counted in one place (analysis.routing.expert_counts)
    from mixtral_edu.analysis.routing import expert_counts, expert_usage
    from mixtral_edu.training.losses import expert_load

    g = torch.Generator().manual_seed(1)
    layers = [torch.randn(37, 8, generator=g) * s for s in (0.5, 4.0, 9.0)]
    load = layer_load(layers, top_k=2)
    for logits, row in zip(layers, load):
        ids = torch.topk(logits, 2, dim=-1).indices
        counts, _ = expert_load(logits, 2)
        assert torch.equal(counts, expert_counts(ids, 8).float())
        assert torch.equal(row, expert_usage(ids, 8).float())
        assert torch.allclose(row * 74, counts)


def test_balance_loss_is_the_per_layer_mean():
    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(50, 8, generator=g) * s for s in (0.1, 3.0)]
    expected = (load_balancing_loss(layers[0], 2) + load_balancing_loss(layers[1], 2)) / 2
    assert balance_loss(layers, 2).item() == pytest.approx(expected.item())


def test_same_seed_same_weights_other_seed_other_weights():
    cfg, streams = small_cfg(), random_streams()
    kw = dict(steps=4, batch_size=3, seq_len=16, log_every=2, warmup_steps=2)
    a, ha = train(cfg, streams, seed=1, **kw)
    b, hb = train(cfg, streams, seed=1, **kw)
    c, _ = train(cfg, streams, seed=2, **kw)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert ha.loss == hb.loss and ha.step == [2, 4]
    assert ha.load_tensor().shape == (2, 4, 8)
    assert torch.allclose(ha.load_tensor().sum(-1), torch.ones(2, 4))


def test_training_learns_a_repeating_pattern():
    pattern = torch.tensor([5, 17, 42, 99, 7, 250, 31, 64])
    streams = {d: pattern.repeat(100) for d in DOMAINS}
    cfg = small_cfg()
    model, history = train(cfg, streams, steps=80, seed=0, batch_size=3, seq_len=16, lr=1e-2,
                           warmup_steps=5, log_every=10)
    assert history.loss[0] > 4.0 and history.loss[-1] < 0.5
    heldout = evaluate(model, {"p": pattern.repeat(10)}, seq_len=16)
    assert heldout["p"] < 0.5
    assert not model.training


def test_z_loss_and_no_balance_change_the_objective():
    cfg, streams = small_cfg(), random_streams()
    kw = dict(steps=3, batch_size=3, seq_len=16, log_every=1, seed=0)
    base, _ = train(cfg, streams, **kw)
    no_bal, _ = train(cfg, streams, aux_loss_coef=0.0, **kw)
    z, hz = train(cfg, streams, z_loss_coef=1e-2, **kw)
    w = "layers.0.block_sparse_moe.gate.weight"
    assert not torch.equal(base.state_dict()[w], no_bal.state_dict()[w])
    assert not torch.equal(base.state_dict()[w], z.state_dict()[w])
    assert all(v > 0 for v in hz.z_loss)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="TrainConfig.steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="aux_loss_coef"):
        TrainConfig(aux_loss_coef=-1.0)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        train(small_cfg(), random_streams(), steps=1, seq_len=128)
    with pytest.raises(ValueError, match="--set 'colour=red'"):
        model_config_from_args(None, ["colour=red"])
    assert model_config_from_args(None, ["num_hidden_layers=6"]).num_hidden_layers == 6


def _tiny_corpus(folder):
    texts = {
        "python": ["def add(a, b):\n    return a + b\n" * 20],
        "prose": ["And the light shone upon the waters, and it was good. " * 20],
        "arithmetic": ["Question: What is 2 + 3?\nAnswer: 5\n\n" * 20],
    }
    for domain, docs in texts.items():
        for split in SPLITS:
            with open(folder / f"{domain}.{split}.jsonl", "w") as f:
                for doc in docs:
                    f.write(json.dumps({"text": doc}) + "\n")


SMALL_ARGS = ["--set", "hidden_size=16", "--set", "intermediate_size=32", "--set", "head_dim=4",
              "--steps", "3", "--batch-size", "3", "--seq-len", "16", "--eval-windows", "2",
              "--log-every", "1", "--no-progress", "--threads", "1"]


def test_command_line_trains_and_saves_a_loadable_checkpoint(tmp_path, capsys):
    _tiny_corpus(tmp_path)
    out = tmp_path / "ckpt"
    assert main(["--out", str(out), "--corpus", str(tmp_path), *SMALL_ARGS]) == 0
    printed = capsys.readouterr().out
    assert "step      3" in printed and "held-out loss: python" in printed
    for name in ("config.json", "model.safetensors", "tokenizer.model", "README.md", "training_log.json"):
        assert (out / name).is_file(), name
    model = load_model(out)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_local_experts, cfg.num_experts_per_tok, cfg.vocab_size) == (16, 8, 2, 32000)
    log = json.loads((out / "training_log.json").read_text())
    assert log["history"]["step"] == [1, 2, 3] and set(log["heldout_loss"]) == set(DOMAINS)
    # the saved weights reproduce the logged held-out loss
    from mixtral_edu.training.corpus import load_split, token_streams
    from mixtral_edu.tokenizer import Tokenizer
    streams = token_streams(Tokenizer(), load_split("heldout", tmp_path))
    again = evaluate(model, streams, seq_len=16, max_windows=2)
    for d in DOMAINS:
        assert again[d] == pytest.approx(log["heldout_loss"][d], abs=1e-4)
    assert "python -m mixtral_edu.training.train --out" in (out / "README.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--set", "colour=red"], "colour=red"),
    (["--steps", "0"], "TrainConfig.steps"),
    (["--set", "vocab_size=100"], "vocab_size 100"),
])
def test_command_line_refuses_bad_input(tmp_path, capsys, args, message):
    assert main(["--out", str(tmp_path / "x"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_dense_config_trains_without_router_losses():
    cfg = small_cfg(num_local_experts=1, num_experts_per_tok=1)
    model, history = train(cfg, random_streams(), steps=2, seed=0, batch_size=3, seq_len=16, log_every=1)
    assert history.aux_loss == [0.0, 0.0] and history.z_loss == [0.0, 0.0]
    assert model.layers[0].block_sparse_moe.gate is None


def test_config_json_with_overrides(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(small_cfg().to_hf_config()))
    cfg = model_config_from_args(str(path), ["num_hidden_layers=5", "rope_theta=10000.0"])
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.rope_theta, cfg.vocab_size) == (16, 5, 10000.0, 300)
