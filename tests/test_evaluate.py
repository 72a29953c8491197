"""Evaluation: the chunked response loss against the model's own loss and a float64 brute force, the
bound on the logits it materialises, and predictions kept one per row with their scores."""

import json
import math
from collections import defaultdict

import pytest
import torch

from grit_study.data import PadCollator, build_study_data, response_token_count
from grit_study.evaluate import (accuracy, causal_lm_parts, eval_loss, generate, read_predictions,
                                 score_predictions, write_predictions)
from grit_study.models import load_peft_model, load_tokenizer, tiny_dir
from grit_study.presets import resolve_preset


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin:tiny")


@pytest.fixture(scope="module")
def data(tok):
    return build_study_data(tok, source="synthetic", num_examples=120, val_size=8, test_size=24, max_seq_length=96,
                            data_seed=3)


@pytest.fixture(scope="module")
def peft_model():
    """The tiny preset's 4-bit PEFT model (lora_alpha != r) with non-zero, seeded B, so adapters count."""
    model = load_peft_model(resolve_preset("tiny"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def own_loss_sum(model, examples, pad, batch_size):
    """Σ token CE from the model's own loss (sum / num_items_in_batch, times the count)."""
    total, count = 0.0, 0
    collate = PadCollator(pad)
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            b = collate(examples[i:i + batch_size])
            n = response_token_count(b["labels"])
            total += float(model(**b, num_items_in_batch=torch.tensor(n)).loss) * n
            count += n
    return total, count


def brute_force_sum(model, examples, pad):
    """Σ token CE in float64 from full-sequence logits, one example at a time, no shift helper."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)   # (L, V)
            for j in range(1, len(ex["labels"])):
                if ex["labels"][j] != -100:
                    total -= float(logp[j - 1, ex["labels"][j]])
                    count += 1
    return total, count


@pytest.mark.slow
def test_chunked_loss_equals_the_models_own_loss(peft_model, data, tok):
    examples = data.val + data.test
    loss, n = eval_loss(peft_model, examples, tok.pad_token_id, batch_size=5, chunk_positions=7)
    own_total, own_n = own_loss_sum(peft_model, examples, tok.pad_token_id, 5)
    bf_total, bf_n = brute_force_sum(peft_model, examples, tok.pad_token_id)
    assert n == own_n == bf_n
    assert loss == pytest.approx(own_total / own_n, rel=1e-6)
    assert loss == pytest.approx(bf_total / bf_n, rel=1e-6)
    # The chunk size changes nothing but rounding.
    assert eval_loss(peft_model, examples, tok.pad_token_id, batch_size=8, chunk_positions=10_000)[0] == \
        pytest.approx(loss, rel=1e-6)
    # Adapters act on the chunked path: disabling them changes the loss, and matches the model's own again.
    with peft_model.disable_adapter():
        off, _ = eval_loss(peft_model, examples, tok.pad_token_id, batch_size=5, chunk_positions=7)
        off_total, _ = own_loss_sum(peft_model, examples, tok.pad_token_id, 5)
    assert off == pytest.approx(off_total / own_n, rel=1e-6) and abs(off - loss) > 1e-3


@pytest.mark.slow
def test_chunk_bounds_the_logits_the_head_sees(peft_model, data, tok):
    _, head = causal_lm_parts(peft_model)
    seen = []
    handle = head.register_forward_hook(lambda m, args, out: seen.append(tuple(out.shape)))
    try:
        _, n = eval_loss(peft_model, data.test, tok.pad_token_id, batch_size=8, chunk_positions=16)
    finally:
        handle.remove()
    vocab = peft_model.get_base_model().config.vocab_size
    rows = [math.prod(s[:-1]) for s in seen]
    assert seen and all(s[-1] == vocab for s in seen)
    assert max(rows) <= 16            # never more than a chunk of positions at once
    assert sum(rows) == n             # and only the response positions, each once


@pytest.mark.slow
def test_plain_causal_lm_and_refused_logit_transforms(data, tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir(), dtype=torch.float32).eval()
    loss, n = eval_loss(model, data.val, tok.pad_token_id, batch_size=3, chunk_positions=5)
    total, count = brute_force_sum(model, data.val, tok.pad_token_id)
    assert n == count and loss == pytest.approx(total / count, rel=1e-6)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        eval_loss(model, data.val, tok.pad_token_id)


def test_score_predictions_keeps_every_prediction(data, tmp_path):
    rows = data.test_rows
    # Right answer (padded with whitespace) on every third row, a wrong one elsewhere.
    outputs = [f"  {r['output']}\n" if i % 3 == 0 else r["output"] + "x" for i, r in enumerate(rows)]
    got = score_predictions(outputs, rows)
    assert [p["id"] for p in got["predictions"]] == [r["id"] for r in rows]
    assert [p["output"] for p in got["predictions"]] == outputs
    assert [p["correct"] for p in got["predictions"]] == [i % 3 == 0 for i in range(len(rows))]
    expected = defaultdict(lambda: [0, 0])
    for i, r in enumerate(rows):
        expected[r["family"]][0] += i % 3 == 0
        expected[r["family"]][1] += 1
    assert got["per_family"] == {f: {"n": n, "correct": c, "exact_match": c / n}
                                 for f, (c, n) in sorted(expected.items())}
    assert got["exact_match"] == pytest.approx(sum(i % 3 == 0 for i in range(len(rows))) / len(rows))
    path = write_predictions(tmp_path / "predictions.jsonl", got["predictions"])
    assert read_predictions(path) == got["predictions"]
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == [r["id"] for r in rows]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.jsonl"]  # no temporary left behind


@pytest.mark.slow
def test_accuracy_returns_one_scored_prediction_per_row(peft_model, data, tok):
    rows = data.test_rows[:6]
    got = accuracy(peft_model, tok, rows, "alpaca", batch_size=4)
    outputs = generate(peft_model, tok, rows, "alpaca", max_new_tokens=max(
        len(tok(r["output"], add_special_tokens=False)["input_ids"]) for r in rows) + 5, batch_size=4)
    assert [p["output"] for p in got["predictions"]] == outputs
    assert [(p["id"], p["family"], p["reference"]) for p in got["predictions"]] == \
        [(r["id"], r["family"], r["output"]) for r in rows]
    assert got["n"] == 6 and sum(v["n"] for v in got["per_family"].values()) == 6


@pytest.mark.slow
def test_final_evaluation_saves_per_prompt_sums_that_add_up_to_an_independent_loss(tmp_path, monkeypatch):
    """Per test prompt the saved NLL sum and token count; Σ sums / Σ counts equals the mean response CE of a
    forward pass computed here (the model's logits, torch's cross_entropy), per prompt too; the base model's
    test loss likewise, with the adapters zeroed; per retention text its KL sum, adding up to the summary's
    retention KL."""
    import torch.nn.functional as F

    from grit_study import arms
    from grit_study.evaluate import read_jsonl
    from grit_study.files import PER_PROMPT_NAME, SUMMARY_NAME
    from grit_study.retention import GENERIC_PROMPTS, PER_TEXT_NAME
    from grit_study.runs import SummaryFile
    from grit_study.stats import parse_per_prompt

    preset = resolve_preset("tiny")
    tok = load_tokenizer(preset.model_id)
    data = arms.study_data(preset, tok)
    model = load_peft_model(preset)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # adapters that count
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    monkeypatch.setenv("GRIT_CACHE_DIR", str(tmp_path / "cache"))  # the retention texts, sampled fresh
    monkeypatch.setenv("GRIT_ACCURACY_CACHE", str(tmp_path / "base_accuracy.json"))  # the base, measured fresh
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / SUMMARY_NAME).write_text(json.dumps({"model_id": preset.model_id}))
    res = arms.ArmResult("control", preset, model, tok, None, SummaryFile(run_dir), data, run_dir,
                         shared_tokenizer=tok)
    summary = dict(arms.final_evaluation(res, accuracy=False))

    lines = read_jsonl(run_dir / PER_PROMPT_NAME)
    assert [r["id"] for r in lines] == [r["id"] for r in data.test_rows]
    assert len(parse_per_prompt(lines)) == len(lines)  # the format the sweep's statistics read
    expected_sums, expected_counts = [], []
    model.eval()
    with torch.no_grad():
        for ex in data.test:
            logits = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0].double()   # (L, V)
            labels = torch.tensor(ex["labels"][1:])                                        # the next tokens
            expected_sums.append(float(F.cross_entropy(logits[:-1], labels, ignore_index=-100, reduction="sum")))
            expected_counts.append(int((labels != -100).sum()))
    assert [r["tokens"] for r in lines] == expected_counts
    assert [r["nll_sum"] for r in lines] == pytest.approx(expected_sums, rel=1e-5)
    mean = sum(r["nll_sum"] for r in lines) / sum(r["tokens"] for r in lines)
    assert mean == pytest.approx(sum(expected_sums) / sum(expected_counts), rel=1e-6)
    assert summary["test_loss"] == pytest.approx(mean, rel=1e-12) and summary["test_tokens"] == sum(expected_counts)

    # The base model's test loss: the same forward pass with every lora_B zeroed (so the adapters add
    # nothing), not through disable_adapter(), which the code uses.
    zeroed = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    base_sums = []
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.zero_()
        for ex in data.test:
            logits = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0].double()
            labels = torch.tensor(ex["labels"][1:])
            base_sums.append(float(F.cross_entropy(logits[:-1], labels, ignore_index=-100, reduction="sum")))
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(zeroed[n])
    assert summary["base_test_loss"] == pytest.approx(sum(base_sums) / sum(expected_counts), rel=1e-5)
    assert abs(summary["base_test_loss"] - summary["test_loss"]) > 1e-3  # the adapters count, so the two differ
    assert summary["base_test_loss_cached"] is False

    texts = read_jsonl(run_dir / PER_TEXT_NAME)
    assert [t["index"] for t in texts] == list(range(len(GENERIC_PROMPTS)))
    assert sum(t["tokens"] for t in texts) == summary["retention_tokens"]
    kl = sum(t["kl_sum"] for t in texts) / summary["retention_tokens"]
    assert summary["retention_kl"] > 0 and kl == pytest.approx(summary["retention_kl"], rel=1e-9)
    # Written again (a re-evaluation): replaced, not appended.
    again = dict(arms.final_evaluation(res, accuracy=False))
    assert read_jsonl(run_dir / PER_PROMPT_NAME) == lines and read_jsonl(run_dir / PER_TEXT_NAME) == texts
    # The base is measured once per examples: read back from the cache the second time.
    assert again["base_test_loss_cached"] is True and again["base_test_loss"] == summary["base_test_loss"]
