"""The tiny instruct model and notebook 01b: the data, the loss mask, the checkpoint, and every number the
notebook states, recomputed."""

import json
import random
import re
from pathlib import Path

import pytest
import torch

from mixtral_edu.chat import encode_chat
from mixtral_edu.training.instruct import (
    FAMILIES, INJECTION, ROUTE_NAMES, evaluate, greedy_batch, heldout_prompts, injection_rate, is_correct, loss_mask,
    make_batch, masked_loss, question, route_accuracy, routes, splits, training_chat, word_list,
)
from mixtral_edu.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = ROOT / "data" / "tiny-mixtral-instruct"
NOTEBOOK = ROOT / "notebooks" / "01b_template_experiment.ipynb"
TOK = Tokenizer()


# ----------------------------------------------------------------------------- the data
def test_word_list_is_large_and_plain():
    words = word_list()
    assert len(words) > 5000
    assert all(re.fullmatch(r"[a-z]{3,10}", w) for w in words)
    assert list(words) == sorted(set(words))


def test_heldout_items_never_in_training_in_either_order():
    sp = splits()
    for family in FAMILIES:
        train, held = set(sp.train[family]), set(sp.heldout[family])
        assert train and held and not train & held
    for family in ("sum", "larger"):
        assert all((b, a) in set(sp.heldout[family]) for a, b in sp.heldout[family])
        assert len(sp.train[family]) + len(sp.heldout[family]) == (10000 if family == "sum" else 9900)
    assert not any(a == b for a, b in sp.heldout["larger"] + sp.train["larger"])


def test_training_chats_use_only_training_items():
    rng = random.Random(1)
    held_users = {question(f, item, k)[0] for f in FAMILIES for item in splits().heldout[f]
                  for k in range(4 if f != "larger" else 3)}
    kinds = set()
    for _ in range(2000):
        chat = training_chat(rng)
        kinds.add((chat[0]["role"] == "system", sum(m["role"] == "user" for m in chat)))
        for m in chat:
            assert m["role"] != "user" or m["content"] not in held_users
    assert {(False, 1), (True, 1), (False, 3), (True, 2)} <= kinds   # single and multi-turn, with and without system


def test_random_words_are_letters_never_a_heldout_word_and_off_by_default():
    from mixtral_edu.training.instruct import random_word

    held = frozenset(splits().heldout["word"])
    rng = random.Random(3)
    words = [random_word(rng, held) for _ in range(2000)]
    assert all(re.fullmatch(r"[a-z]{3,10}", w) and w not in held for w in words)
    assert random_word(random.Random(0), frozenset({random_word(random.Random(0))})) != random_word(random.Random(0))
    # random_words=0 draws exactly the chats of before (the shipped model's command stays reproducible)
    assert [training_chat(random.Random(5)) for _ in range(50)] == \
        [training_chat(random.Random(5), random_words=0.0) for _ in range(50)]
    chats = [training_chat(random.Random(k), random_words=1.0) for k in range(300)]
    answers = {m["content"] for c in chats for m in c if m["role"] == "assistant" and m["content"].isalpha()}
    real = answers & set(word_list())                  # a random string is a real word only by chance
    assert len(answers) > 100 and len(real) < 0.05 * len(answers)


def test_heldout_prompts_are_fixed_and_use_the_exact_phrasings():
    prompts = heldout_prompts(100)
    assert prompts == heldout_prompts(100)
    assert [sum(p["family"] == f for p in prompts) for f in FAMILIES] == [100, 100, 100]
    for p in prompts:
        pattern = {"sum": r"What is (\d+) plus (\d+)\?", "word": r"Reply with only the word: ([a-z]+)",
                   "larger": r"Which is larger, (\d+) or (\d+)\?"}[p["family"]]
        m = re.fullmatch(pattern, p["user"])
        assert m
        if p["family"] == "sum":
            assert p["answer"] == str(int(m[1]) + int(m[2]))
        elif p["family"] == "larger":
            assert p["answer"] == str(max(int(m[1]), int(m[2])))
        else:
            assert p["answer"] == m[1]


def test_loss_mask_trains_answers_and_every_eos_only():
    chat = [{"role": "system", "content": "Answer the question."}, {"role": "user", "content": "What is 1 plus 2?"},
            {"role": "assistant", "content": "3"}, {"role": "user", "content": "Reply with only the word: lamb"},
            {"role": "assistant", "content": "lamb"}]
    ids, mask = loss_mask(TOK, chat)
    assert ids == encode_chat(TOK, chat)
    trained = [i for i, m in zip(ids, mask) if m]
    assert trained == TOK.encode("3") + [2] + TOK.encode("lamb") + [2]
    inputs, targets, m = make_batch(TOK, [chat, chat[:3]])
    assert inputs.shape == targets.shape == m.shape == (2, len(ids) - 1)
    assert targets[0][m[0]].tolist() == trained
    assert targets[1][m[1]].tolist() == TOK.encode("3") + [2]   # the padding of the shorter row is not trained


def test_masked_loss_equals_the_full_forward_on_the_masked_positions():
    from mixtral_edu.config import MixtralConfig
    from mixtral_edu.model.mixtral import Mixtral

    torch.manual_seed(0)
    model = Mixtral(MixtralConfig.tiny(num_hidden_layers=2)).eval()
    rng = random.Random(0)
    inputs, targets, mask = make_batch(TOK, [training_chat(rng) for _ in range(3)])
    loss, _ = masked_loss(model, inputs, targets, mask)
    logits = model(inputs)
    full = torch.nn.functional.cross_entropy(logits[mask].float(), targets[mask])
    torch.testing.assert_close(loss, full, rtol=1e-5, atol=1e-5)


def test_tie_embeddings_shares_one_matrix_and_keeps_the_rest():
    from mixtral_edu.config import MixtralConfig
    from mixtral_edu.training.instruct import tie_embeddings
    from mixtral_edu.model.mixtral import Mixtral

    torch.manual_seed(0)
    model = Mixtral(MixtralConfig.tiny(num_hidden_layers=1))
    tied = tie_embeddings(model)
    assert tied.config.tie_word_embeddings and tied.lm_head.weight is tied.embed_tokens.weight
    torch.testing.assert_close(tied.embed_tokens.weight, model.embed_tokens.weight)
    for (name, a), (_, b) in zip(model.layers.named_parameters(), tied.layers.named_parameters()):
        assert torch.equal(a, b), name


def test_scratch_model_has_tied_random_rows_of_one_length_and_takes_overrides():
    from mixtral_edu.config import MixtralConfig
    from mixtral_edu.training.instruct import scratch_model

    cfg = MixtralConfig.tiny(hidden_size=32, num_hidden_layers=1)
    model = scratch_model(0, cfg, row_norm=3.0)
    weight = model.embed_tokens.weight
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 1
    assert model.config.tie_word_embeddings and model.lm_head.weight is weight
    torch.testing.assert_close(weight.norm(dim=1), torch.full((32000,), 3.0))
    assert torch.equal(weight, scratch_model(0, cfg, row_norm=3.0).embed_tokens.weight)
    assert not torch.equal(weight, scratch_model(1, cfg, row_norm=3.0).embed_tokens.weight)


def test_frozen_embedding_does_not_move_in_finetuning_and_the_rest_does():
    from mixtral_edu.training.instruct import finetune, freeze_embeddings, instruct_config, scratch_model

    from mixtral_edu.config import MixtralConfig

    model = freeze_embeddings(scratch_model(0, MixtralConfig.tiny(num_hidden_layers=1)))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    finetune(model, TOK, instruct_config(steps=2, batch_size=2, warmup_steps=1, log_every=1))
    after = dict(model.named_parameters())
    assert torch.equal(after["embed_tokens.weight"], before["embed_tokens.weight"])
    assert not torch.equal(after["layers.0.self_attn.q_proj.weight"], before["layers.0.self_attn.q_proj.weight"])


# ----------------------------------------------------------------------------- the checkpoint
@pytest.fixture(scope="module")
def model():
    from mixtral_edu.weights import load_model

    torch.set_num_threads(1)
    return load_model(WEIGHTS, progress=False)


def test_checkpoint_is_small_tiny_and_moe(model):
    size = sum(f.stat().st_size for f in WEIGHTS.iterdir() if f.is_file())
    assert size <= 30 * 1024 * 1024
    cfg = model.config
    assert cfg.vocab_size == 32000 and cfg.num_local_experts == 8 and cfg.num_experts_per_tok == 2
    assert (WEIGHTS / "tokenizer.model").read_bytes() == TOK.path.read_bytes()
    log = json.loads((WEIGHTS / "training_log.json").read_text())
    # the module was mixtral_edu.instruct before the package took subpackages
    assert log["command"].startswith(("python -m mixtral_edu.training.instruct ", "python -m mixtral_edu.instruct "))
    assert all(log["heldout_accuracy"][family] >= 0.9 for family in FAMILIES)


def test_greedy_batch_matches_generate(model):
    from mixtral_edu.inference.generate import generate

    prompts = [encode_chat(TOK, [{"role": "user", "content": p["user"]}]) for p in heldout_prompts(4)]
    assert greedy_batch(model, prompts) == [generate(model, p, 8) for p in prompts]


def test_heldout_accuracy_with_correct_ids_is_what_the_notebook_claims(model):
    # every family reaches 90% with the correct ids (issue 17), as the notebook states
    result = evaluate(model, TOK, heldout_prompts(100))
    claims = next(t for t in _outputs() if t.startswith("sum     correct ids"))
    for family in FAMILIES:
        assert f"{family:7} correct ids ≥ 90%: {result['accuracy'][family] >= 0.9}" in claims
    assert all(result["accuracy"][family] >= 0.9 for family in FAMILIES), result["accuracy"]
    assert is_correct(TOK, TOK.encode("42") + [2], "42") and not is_correct(TOK, TOK.encode("42"), "42")


# ----------------------------------------------------------------------------- the notebook's numbers
def _outputs():
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    return ["".join(o.get("text", "")) for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]


def _table(header_start, header_lines=1):
    """{route: the cells of its row} of the notebook output that starts with `header_start`."""
    text = next(t for t in _outputs() if t.startswith(header_start))
    rows = {}
    for line in text.splitlines()[header_lines:]:
        name = next(n for n in ROUTE_NAMES if line.startswith(n))
        rows[name] = line[len(name):].split()
    assert list(rows) == list(ROUTE_NAMES)
    return rows


@pytest.fixture(scope="module")
def route_table():
    return routes(TOK)


def test_notebook_route_accuracy_table_is_what_the_model_does(model, route_table):
    stated = _table("route                                             sum")
    measured = route_accuracy(model, TOK, route_table, heldout_prompts(100))
    for name in ROUTE_NAMES:
        assert stated[name] == [f"{measured[name][f]:.0%}" for f in FAMILIES], name
    assert measured["token level (encode_chat)"]["sum"] >= 0.9


def test_notebook_injection_table_is_what_the_model_does(model, route_table):
    stated = _table("route                                        EOS ids")
    sums = [p for p in heldout_prompts(100) if p["family"] == "sum"]
    measured = injection_rate(model, TOK, route_table, sums)
    for name in ROUTE_NAMES:
        eos = route_table[name]([{"role": "user", "content": sums[0]["user"] + INJECTION}]).count(2)
        assert stated[name] == [str(eos)] + [f"{measured[name][k]:.0%}" for k in ("pwned", "first_piece", "correct")], name
    # the notebook's claims: every route obeys the injection's first piece, none finishes the word, none answers the sum
    assert all(measured[n]["first_piece"] == 1.0 and measured[n]["pwned"] == 0.0 and measured[n]["correct"] == 0.0
               for n in ROUTE_NAMES)


def test_notebook_injection_without_its_closing_marker_is_what_the_model_does(model, route_table):
    short = INJECTION.removesuffix(" [/INST]")
    stated = _table(f"injection {short!r}\n", header_lines=2)
    sums = [p for p in heldout_prompts(100) if p["family"] == "sum"]
    measured = injection_rate(model, TOK, route_table, sums, injection=short)
    for name in ROUTE_NAMES:
        assert stated[name] == [f"{measured[name][k]:.0%}" for k in ("pwned", "correct")], name
    assert all(measured[n]["pwned"] == 1.0 for n in ROUTE_NAMES)   # "every route answers pwned, 100%"


def test_notebook_one_extra_piece_turns_word_questions_into_number_answers(model, route_table):
    text = next(t for t in _outputs() if " words wrong; " in t)
    words = [p for p in heldout_prompts(100) if p["family"] == "word"]
    result = evaluate(model, TOK, words, encode=route_table["2024 template + AutoTokenizer"])
    wrong = [(p["answer"], TOK.pieces(r)) for p, r, ok in zip(words, result["replies"], result["correct"]) if not ok]
    starts_number = sum(r[0] == "▁" for _, r in wrong)
    assert text.splitlines()[0].startswith(f"{len(wrong)} of {len(words)} words wrong; {starts_number} of those")
    assert text.splitlines()[1] == f"first three: {wrong[:3]}"
    # the prose: that route's only difference from the token level is one ▁ after <s>, and it costs words
    good = encode_chat(TOK, [{"role": "user", "content": words[0]["user"]}])
    bad = route_table["2024 template + AutoTokenizer"]([{"role": "user", "content": words[0]["user"]}])
    assert bad == good[:1] + [TOK.piece_to_id("▁")] + good[1:]
    assert result["accuracy"]["word"] < 0.9 and starts_number >= 0.9 * len(wrong)
    nb_prose = "".join("".join(c["source"]) for c in json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"])
    assert f"{starts_number} of\n  its {len(wrong)} wrong replies start with `▁`" in nb_prose


@pytest.mark.parametrize("argv, names", [
    (["--from-scratch", "--set", "bogus=1"], "bogus"),
    (["--from-scratch", "--set", "hidden_size=abc"], "hidden_size"),
    (["--set", "hidden_size=128"], "--from-scratch"),
])
def test_training_command_refuses_a_bad_set_in_one_line_before_any_work(argv, names, tmp_path, capsys):
    from mixtral_edu.training.instruct import main

    out = tmp_path / "out"
    assert main(["--out", str(out), "--steps", "1", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and names in err
    assert not out.exists()
