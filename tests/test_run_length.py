"""A user's own data file gets splits that fit it, and a run that would draw its train split less than once
per step or more than a few times is refused before anything trains.

The case behind it: a 342-row instruction file through preset smollm2-135m (val 128, test 256 prompts) was
split into tiny train and val splits without a word, and 60 steps then drew the train rows ~18 times.
"""

import json

import pytest

from grit_study import arms
from grit_study.data import MAX_EPOCHS, MAX_HELD_OUT_SHARE, DataError, build_study_data
from grit_study.models import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin:tiny")


def instruction_file(tmp_path, n: int):
    rows = [{"instruction": f"Write a sentence about topic number {i}.", "input": "" if i % 3 else f"style {i}",
             "output": f"Topic {i} is interesting."} for i in range(n)]
    path = tmp_path / f"rows{n}.json"
    path.write_text(json.dumps(rows))
    return str(path)


def test_a_342_row_file_gets_splits_scaled_to_it(tok, tmp_path):
    source = instruction_file(tmp_path, 342)
    preset = arms.study_preset("smollm2-135m", data=source)  # val 128, test 256 prompts: written for 2,000 rows
    data = arms.study_data(preset, tok)
    cap = int(342 * MAX_HELD_OUT_SHARE)  # 85: a quarter of the distinct prompts each
    assert (len(data.val), len(data.test), len(data.train)) == (cap, cap, 342 - 2 * cap)
    summary = data.summary()
    assert summary["sizes_asked"] == {"val": 128, "test": 256}
    # 60 steps x 2 x 4 sequences over 172 rows.
    assert summary["epochs"] == pytest.approx(60 * 8 / 172) and summary["epochs"] <= MAX_EPOCHS


def test_too_many_epochs_are_refused_before_training(tok, tmp_path, monkeypatch):
    source = instruction_file(tmp_path, 342)
    preset = arms.study_preset("smollm2-135m", data=source, max_steps=200)  # 1,600 sequences from 172 rows

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded for a run that must be refused first")

    monkeypatch.setattr(arms, "load_base_model", no_model)
    with pytest.raises(DataError) as e:
        arms.run_hf(preset, "control", logdir=str(tmp_path / "logs"), output_dir=str(tmp_path / "out"))
    message = str(e.value)
    for part in ("172 rows", "val 85, test 85", "9.3 epochs", "MAX_STEPS <= 86", "bigger file", "GRIT_VAL_SIZE"):
        assert part in message, (part, message)
    assert not (tmp_path / "logs").exists()  # no run directory either


def test_a_train_split_smaller_than_one_step_is_refused(tok, tmp_path):
    preset = arms.study_preset("smollm2-135m", data=instruction_file(tmp_path, 12), max_steps=1)
    with pytest.raises(DataError, match=r"train split has 6 rows \(val 3, test 3.*fewer than the 8 sequences"):
        arms.study_data(preset, tok)


def test_synthetic_sizes_are_never_scaled(tok):
    # Synthetic rows are drawn for their preset: a test split above the file cap (a quarter) stays as asked.
    data = build_study_data(tok, source="synthetic", num_examples=200, val_size=40, test_size=80,
                            max_seq_length=128, data_seed=3407)
    assert data.distinct_prompts * MAX_HELD_OUT_SHARE < 80
    assert (len(data.val), len(data.test)) == (40, 80) and data.summary()["sizes_asked"] is None


def test_responses_are_cut_not_dropped_and_the_kept_shares_are_recorded(tok, tmp_path):
    from grit_study.data import IGNORE_INDEX, format_prompt, prompt_ids
    from grit_study.runs import data_figures

    long = {"instruction": "Count.", "input": "", "output": " ".join(str(i) for i in range(200))}
    rows = [long] + [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(40)]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    data = build_study_data(tok, source=str(path), max_seq_length=64, val_size=0, test_size=0, data_seed=1)
    assert len(data.train) == len(rows) and data.dropped_no_response == 0
    # Independent count: prompt and response tokenized here, the response cut at 64 tokens in all.
    n_prompt = [len(prompt_ids(format_prompt(r, tok, "alpaca"), tok, "alpaca")) for r in rows]
    n_response = [len(tok(r["output"], add_special_tokens=False)["input_ids"]) + 1 for r in rows]  # + EOS
    kept = [min(r, 64 - p) for p, r in zip(n_prompt, n_response)]
    assert kept[0] < n_response[0] and kept[1:] == n_response[1:]
    cut = next(e for e, r in zip(data.train, data.train_rows) if r["output"] == long["output"])
    assert len(cut["input_ids"]) == 64 and cut["labels"][-1] != tok.eos_token_id
    assert sum(label != IGNORE_INDEX for label in cut["labels"]) == kept[0]
    figures = data.token_retention("train")
    assert figures["response_share"] == pytest.approx(sum(kept) / sum(n_response))
    assert figures["eos_share"] == pytest.approx((len(rows) - 1) / len(rows))
    data.epochs = 2.5
    assert data_figures(data.summary()) == {"epochs": 2.5, "response_tokens_kept_share": figures["response_share"],
                                            "eos_tokens_kept_share": figures["eos_share"]}
