"""Every workshop checker: blank -> not attempted, the worked solution passes, a plausible wrong answer fails."""

import pytest

from mixtral_edu.chat import MIXTRAL_HF_TEMPLATE_2023, encode_chat
from mixtral_edu.tokenizer import Tokenizer
from mixtral_edu.course.workshop import (
    IGNORE_INDEX, WORKSHOP_CHAT, WrongAnswer, check_task1_double_bos, check_task2_visible_log, check_task3_stop,
    check_task4_labels, check_task5_truncate,
)

TOK = Tokenizer()


def blank(*args):
    ...


@pytest.mark.parametrize("checker", [check_task1_double_bos, check_task2_visible_log, check_task3_stop,
                                     check_task4_labels, check_task5_truncate])
def test_blank_is_not_attempted(checker, capsys):
    assert checker(...) is False
    assert "not attempted yet" in capsys.readouterr().out
    if checker is not check_task1_double_bos:
        assert checker(blank) is False


# -------------------------------------------------------------------------- task 1
@pytest.fixture(scope="module")
def hf_auto():
    pytest.importorskip("transformers")
    from mixtral_edu.tokenizer import hf_tokenizer

    return hf_tokenizer(loader="auto")


def test_task1_solution_and_the_double_bos(hf_auto):
    text = hf_auto.apply_chat_template(WORKSHOP_CHAT[:1], chat_template=MIXTRAL_HF_TEMPLATE_2023, tokenize=False)
    assert check_task1_double_bos(hf_auto(text, add_special_tokens=False).input_ids) is True
    doubled = hf_auto(text).input_ids
    assert doubled[:2] == [1, 1]
    with pytest.raises(WrongAnswer, match="2 BOS"):
        check_task1_double_bos(doubled)


def test_task1_no_bos_and_one_string_fail():
    with pytest.raises(WrongAnswer, match="0 BOS"):
        check_task1_double_bos(encode_chat(TOK, WORKSHOP_CHAT[:1])[1:])
    with pytest.raises(WrongAnswer):  # the text '<s>' through SentencePiece: no control ids at all
        check_task1_double_bos(TOK.encode("<s>[INST] What is 12 plus 30? [/INST]"))


# -------------------------------------------------------------------------- task 2
def test_task2_solution_passes_and_skip_special_fails():
    def log_line(ids):
        return "".join("<s>" if i == TOK.bos_id else "</s>" if i == TOK.eos_id else TOK.pieces([i])[0].replace("▁", " ")
                       for i in ids)

    assert check_task2_visible_log(log_line) is True
    with pytest.raises(WrongAnswer, match="id\\(s\\) but the line"):
        check_task2_visible_log(lambda ids: TOK.decode(ids))   # decode drops control ids, as skip_special_tokens


# -------------------------------------------------------------------------- task 3
def test_task3_solution_passes_and_text_check_fails():
    assert check_task3_stop(lambda token_id, text: token_id == 2) is True
    with pytest.raises(WrongAnswer):
        check_task3_stop(lambda token_id, text: text.endswith("</s>"))
    with pytest.raises(WrongAnswer):
        check_task3_stop(lambda token_id, text: token_id in (1, 2))


# -------------------------------------------------------------------------- task 4
def test_task4_solution_passes_and_eos_masked_fails():
    from mixtral_edu.chat import chat_segments

    def make_labels(messages):
        ids, labels = [], []
        for kind, seg in chat_segments(TOK, messages):
            ids += seg
            labels += seg if kind in ("assistant", "eos") else [IGNORE_INDEX] * len(seg)
        return ids, labels

    assert check_task4_labels(make_labels) is True

    def answers_only(messages):   # the common slip: EOS treated as a special token and masked
        ids, labels = make_labels(messages)
        return ids, [IGNORE_INDEX if i == 2 else lab for i, lab in zip(ids, labels)]

    with pytest.raises(WrongAnswer, match="EOS"):
        check_task4_labels(answers_only)

    def everything(messages):
        ids, _ = make_labels(messages)
        return ids, list(ids)

    with pytest.raises(WrongAnswer, match="differ"):
        check_task4_labels(everything)


# -------------------------------------------------------------------------- task 5
def test_task5_solution_passes_and_cutting_the_end_fails():
    def truncate(ids, max_len):
        return ids if len(ids) <= max_len else ids[:1] + ids[len(ids) - (max_len - 1):]

    assert check_task5_truncate(truncate) is True
    with pytest.raises(WrongAnswer, match="EOS"):
        check_task5_truncate(lambda ids, max_len: ids[:max_len])
    with pytest.raises(WrongAnswer, match="BOS"):
        check_task5_truncate(lambda ids, max_len: ids[-max_len:])
