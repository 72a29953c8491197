"""IFEval (grit_study.ifeval): the offline Punkt stand-in, lm-eval's checkers on hand-scored responses, resume
bookkeeping, and (runtime) greedy generation through llama.cpp on SmolLM2's GGUF."""

from __future__ import annotations

import json

import pytest

from grit_study import ifeval


@pytest.fixture(scope="module")
def nltk_offline(tmp_path_factory):
    ifeval.prepare_nltk()
    import nltk

    return nltk


def rows_by_key() -> dict:
    return {r["key"]: r for r in ifeval.load_prompts()}


# ----------------------------------------------------------------------------- data


def test_prompt_file_is_ifeval():
    rows = ifeval.load_prompts()
    assert len(rows) == ifeval.N_PROMPTS == 541
    assert sum(len(r["instruction_id_list"]) for r in rows) == 834
    assert ifeval.sha256_file(ifeval.DATA_PATH) == ifeval.DATA_SHA256
    assert [r["key"] for r in ifeval.load_prompts(limit=3)] == [r["key"] for r in rows[:3]]


# ----------------------------------------------------------------------------- the Punkt stand-in

# Split by hand: abbreviations ("Dr.", "p.m.", "U.S.", "Mr.") do not end a sentence; "?", "!" and a closing
# quote after a period do.
HAND_SPLIT = [
    ("Dr. Smith went to Washington. He arrived at 5 p.m. on Monday. Then he left.",
     ["Dr. Smith went to Washington.", "He arrived at 5 p.m. on Monday.", "Then he left."]),
    ("The U.S. economy grew. Mr. Jones agreed.", ["The U.S. economy grew.", "Mr. Jones agreed."]),
    ("He lives in the U.S. He works there.", ["He lives in the U.S.", "He works there."]),
    ("Is it done? Yes! It is done.", ["Is it done?", "Yes!", "It is done."]),
    ('She said, "Go home." Then she left.', ['She said, "Go home."', "Then she left."]),
    ("Wait... what happened? Nobody knows.", ["Wait... what happened?", "Nobody knows."]),
]
# NLTK's English Punkt model as documented in NLTK's own issue tracker, mistakes included (the stand-in must
# reproduce the model, not fix it).
NLTK_DOCUMENTED = [
    # nltk/nltk#2376: "e.g." and "i.e." are not in the English abbreviation list.
    ("Even though exempli gratia and id est are both Latin (and therefore italicized), no need to put e.g. or "
     "i.e. in italics when they\u2019re in abbreviated form.",
     ["Even though exempli gratia and id est are both Latin (and therefore italicized), no need to put e.g.",
      "or i.e.", "in italics when they\u2019re in abbreviated form."]),
    # nltk/nltk#1210: a single capital letter before a period reads as an initial.
    ("Model wears size S. Fits size.", ["Model wears size S. Fits size."]),
    # nltk/nltk#2082: no space after the period, no break.
    ("Mary had little lamb.Mary had a little lamb", ["Mary had little lamb.Mary had a little lamb"]),
]
# The English abbrev_types an NLTK maintainer printed from the installed punkt model (nltk/nltk#2500).
NLTK_ENGLISH_ABBREVS = {
    ". . ", "a.a", "a.c", "a.d", "a.g", "a.h", "a.m", "a.m.e", "a.s", "a.t", "adm", "ala", "ariz", "aug", "ave",
    "b.f", "b.v", "bros", "c", "c.i.t", "c.o.m.b", "c.v", "calif", "chg", "cie", "co", "col", "colo", "conn",
    "corp", "cos", "ct", "d", "d.c", "d.h", "d.w", "dec", "dr", "e", "e.f", "e.h", "e.l", "e.m", "f", "f.g", "f.j",
    "feb", "fla", "fri", "ft", "g", "g.d", "g.f", "g.k", "ga", "gen", "h", "h.c", "h.f", "h.m", "i.m.s", "ill",
    "inc", "j.b", "j.c", "j.j", "j.k", "j.p", "j.r", "jan", "jr", "k", "kan", "ky", "l", "l.a", "l.f", "l.p", "lt",
    "ltd", "m", "m.b.a", "m.d.c", "m.j", "maj", "messrs", "mg", "mich", "minn", "mr", "mrs", "ms", "n", "n.c",
    "n.d", "n.h", "n.j", "n.m", "n.v", "n.y", "nev", "nov", "oct", "ok", "okla", "ore", "p", "p.a.m", "p.m", "pa",
    "ph.d", "prof", "r", "r.a", "r.h", "r.i", "r.j", "r.k", "r.t", "rep", "reps", "s", "s.a", "s.a.y", "s.c",
    "s.g", "s.p.a", "s.s", "sen", "sep", "sept", "sr", "st", "sw", "t", "t.j", "tenn", "tues", "u.k", "u.n", "u.s",
    "u.s.a", "u.s.s.r", "v", "va", "vs", "vt", "w", "w.c", "w.r", "w.va", "w.w", "wash", "wed", "wis", "yr",
}


def test_punkt_tables_are_nltk_english(nltk_offline):
    from nltk.tokenize.punkt import load_punkt_params

    params = load_punkt_params(nltk_offline.data.find("tokenizers/punkt_tab/english/"))
    assert params.abbrev_types == NLTK_ENGLISH_ABBREVS
    assert (len(params.collocations), len(params.sent_starters), len(params.ortho_context)) == (37, 39, 20366)
    assert {"however", "but", "he"} <= params.sent_starters


@pytest.mark.parametrize("text,sentences", HAND_SPLIT + NLTK_DOCUMENTED)
def test_sentence_split(nltk_offline, text, sentences):
    from lm_eval.tasks.ifeval import instructions_util  # imported offline: prepare_nltk ran first

    assert nltk_offline.sent_tokenize(text) == sentences
    assert instructions_util.count_sentences(text) == len(sentences)  # IFEval's own path (english.pickle)


def test_word_counts(nltk_offline):
    from lm_eval.tasks.ifeval import instructions_util

    text = "Dr. Smith isn't here. He left at 5 p.m. with the U.S. team."
    # IFEval's word count (number_words) is a \w+ regex, no Punkt: Dr Smith isn t here He left at 5 p m with
    # the U S team.
    assert instructions_util.count_words(text) == 16
    # word_tokenize (capital_word_frequency): Punkt sentences, then Treebank tokens; a sentence's final period
    # is split off, "p.m." and "U.S." inside a sentence are not.
    tokens = nltk_offline.word_tokenize(text)
    assert tokens == ["Dr.", "Smith", "is", "n't", "here", ".", "He", "left", "at", "5", "p.m.", "with", "the",
                      "U.S.", "team", "."]
    assert [t for t in tokens if t.isupper()] == ["U.S."]


def test_download_is_a_guard(nltk_offline, capsys):
    assert nltk_offline.download("punkt_tab") is True  # present: reported, nothing fetched
    assert "skipped: present" in capsys.readouterr().err
    with pytest.raises(ifeval.IFEvalError, match="not installed"):
        nltk_offline.download("wordnet")


# ----------------------------------------------------------------------------- scoring, worked out by hand

# (key, response, strict verdicts, loose verdicts) per instruction of that IFEval prompt. Each prompt appears
# once with a response that follows everything and once with one that does not.
CASES = [
    # 3739 length_constraints:number_sentences, less than 3. "Dr." is no sentence end: 2 sentences.
    (3739, "Dr. Smith calls it the green-eyed monster. It is jealousy.", [True], [True]),
    # 3 sentences; a single line, so no loose variant differs.
    (3739, "It is jealousy. Shakespeare named it in Othello. People still use the phrase today.", [False], [False]),
    # 2311 punctuation:no_comma.
    (2311, "Almonds are mostly fat. Fat holds nine calories per gram so 32 grams give about 396 calories.",
     [True], [True]),
    # The only comma is on the first line: strict fails, loose (first line removed) passes.
    (2311, "Sure, here is the answer.\nAlmonds are mostly fat and fat is energy dense so 32 grams give about "
           "396 calories.", [False], [True]),
    # 202 change_case:english_lowercase (all lowercase and langdetect says English).
    (202, "another word for engravings is etchings. you could also say carvings or inscriptions.", [True], [True]),
    (202, "Another word for engravings is etchings.", [False], [False]),
    # 2314 detectable_format:number_bullet_lists, exactly 3.
    (2314, "* Domino\n* Oreo\n* Panda", [True], [True]),
    # 2 bullets; dropping the first line leaves 2, dropping the '*' leaves 0.
    (2314, "Here are some names:\n* Domino\n* Oreo", [False], [False]),
    # 260 keywords:existence [friends, hanson] + length_constraints:number_words, less than 50 (here 23).
    (260, "Hanson Lee, refinery operator. Five years in the chemical industry running distillation units safely. "
          "Known by friends and crew as calm under pressure.", [True, True], [True, True]),
    # Both keywords, but 51 words on one line.
    (260, "Hanson Lee is a refinery operator with five years of experience in the chemical industry where he ran "
          "distillation units, monitored pressure and flow, wrote shift reports, trained new staff, kept every "
          "permit current and still found time to organise weekend fishing trips with friends from the plant "
          "and their families.", [True, False], [True, False]),
    # 1128 startend:end_checker "Is there anything else I can help with?".
    (1128, "The sentiment is negative.\nIs there anything else I can help with?", [True], [True]),
    # A trailing line after the phrase: strict fails, loose (last line removed) passes.
    (1128, "The sentiment is negative. Is there anything else I can help with?\nGood luck!", [False], [True]),
    # 1508 keywords:existence [forests, riddle] + punctuation:no_comma.
    (1508, "A riddle in the forests\nGolden mane and silent paws\nKing of the wild grass", [True, True],
     [True, True]),
    # No "riddle" anywhere; the comma sits on the first line, which loose may drop.
    (1508, "Golden mane, silent paws\nKing of the wild grass\nHe roams the forests", [False, False],
     [False, True]),
    # 2849 change_case:capital_word_frequency, at least 2 all-caps words (ALL, BUCKET).
    (2849, "There once was a guy from Nantucket. He kept ALL his cash in a BUCKET.", [True], [True]),
    # Only "I" is all caps.
    (2849, "There once was a guy from Nantucket who kept all his cash in a bucket. I mean it.", [False], [False]),
]


def test_case_word_count_as_stated():
    from grit_study.ifeval import load_checkers

    util = load_checkers().instructions_registry.instructions.instructions_util
    assert util.count_words(CASES[8][1]) == 23
    assert util.count_words(CASES[9][1]) == 51


def test_hand_scored_responses():
    rows = rows_by_key()
    for key, _, strict, _ in CASES:
        assert len(rows[key]["instruction_id_list"]) == len(strict)
    result = ifeval.score_responses([rows[k] for k, *_ in CASES], [r for _, r, *_ in CASES])
    assert [p["strict"] for p in result["per_prompt"]] == [c[2] for c in CASES]
    assert [p["loose"] for p in result["per_prompt"]] == [c[3] for c in CASES]
    # 16 prompts, 20 instructions. Strict: the 8 good responses (10 instructions) plus the keyword half of
    # 260's long response. Loose adds 2311's and 1128's second responses and 1508's comma check.
    assert (result["n_prompts"], result["n_instructions"]) == (16, 20)
    assert result["prompt_level_strict_acc"] == 8 / 16
    assert result["inst_level_strict_acc"] == 11 / 20
    assert result["prompt_level_loose_acc"] == 10 / 16
    assert result["inst_level_loose_acc"] == 14 / 20


def test_empty_response_follows_nothing():
    row = rows_by_key()[2311]  # "no comma" would hold vacuously for an empty text; IFEval counts it failed
    result = ifeval.score_responses([row], ["   "])
    assert result["prompt_level_strict_acc"] == result["prompt_level_loose_acc"] == 0.0


# ----------------------------------------------------------------------------- resume bookkeeping


def test_torn_last_line_is_dropped(tmp_path):
    path = tmp_path / ifeval.RESPONSES_NAME
    good = json.dumps({"key": 1, "response": "a"}) + "\n"
    path.write_text(good + '{"key": 2, "resp', encoding="utf-8")
    assert list(ifeval.read_responses(path)) == [1]
    assert path.read_text(encoding="utf-8") == good
    path.write_text("not json\n" + good, encoding="utf-8")
    with pytest.raises(ifeval.IFEvalError, match="line 1"):
        ifeval.read_responses(path)


def test_settings_change_is_refused(tmp_path):
    settings = {k: 1 for k in ifeval.RUN_KEYS}
    ifeval._check_run(tmp_path, settings)
    ifeval._check_run(tmp_path, settings)  # same settings: resume
    with pytest.raises(ifeval.IFEvalError, match="max_new_tokens"):
        ifeval._check_run(tmp_path, {**settings, "max_new_tokens": 2})


# ----------------------------------------------------------------------------- runtime: llama.cpp


@pytest.mark.runtime
def test_generation_on_smollm2_gguf(tmp_path):
    pytest.importorskip("llama_cpp")
    from grit_study.models import SMOLLM2_GGUF, _smollm2_gguf_dir

    gguf = _smollm2_gguf_dir() / SMOLLM2_GGUF
    out = tmp_path / "ifeval"
    summary = ifeval.run_ifeval(gguf, out, max_new_tokens=24, limit=2, n_threads=2, hash_gguf=False,
                                progress=False)
    lines = (out / ifeval.RESPONSES_NAME).read_text(encoding="utf-8").splitlines()
    recs = [json.loads(line) for line in lines]
    assert [r["key"] for r in recs] == [r["key"] for r in ifeval.load_prompts(limit=2)]
    for r in recs:
        assert set(r) >= {"key", "prompt", "response", "finish_reason", "tokens"}
        assert r["finish_reason"] in ("stop", "length") and 0 < r["tokens"] <= 24
        assert r["response"].strip()
    assert summary["n_prompts"] == 2 and summary["max_new_tokens"] == 24 and not summary["complete"]
    assert summary["share_stop"] + summary["share_length"] == 1.0
    assert json.loads((out / ifeval.SUMMARY_NAME).read_text())["n_instructions"] == summary["n_instructions"]

    # Resume: one more prompt generates only that one; the first two are read back unchanged.
    summary3 = ifeval.run_ifeval(gguf, out, max_new_tokens=24, limit=3, n_threads=2, hash_gguf=False,
                                 progress=False)
    lines3 = (out / ifeval.RESPONSES_NAME).read_text(encoding="utf-8").splitlines()
    assert lines3[:2] == lines and len(lines3) == 3 and summary3["n_prompts"] == 3
    # Greedy and reset per prompt: regenerating prompt 1 alone gives the same text.
    again = ifeval.run_ifeval(gguf, tmp_path / "again", max_new_tokens=24, limit=1, n_threads=2, hash_gguf=False,
                              progress=False)
    first = json.loads((tmp_path / "again" / ifeval.RESPONSES_NAME).read_text().splitlines()[0])
    assert first["response"] == recs[0]["response"] and again["n_prompts"] == 1
    with pytest.raises(ifeval.IFEvalError, match="other settings"):
        ifeval.run_ifeval(gguf, out, max_new_tokens=16, limit=3, n_threads=2, hash_gguf=False, progress=False)


@pytest.mark.runtime
def test_base_model_gguf_through_the_project_converter(tmp_path):
    """The baseline path: the base model converted like an exported run (Alpaca template), then IFEval on it."""
    pytest.importorskip("llama_cpp")
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    from grit_study.export import ALPACA_CHAT_TEMPLATE
    from grit_study.models import tiny_dir

    tok = AutoTokenizer.from_pretrained(tiny_dir())
    gguf = ifeval.convert_base_gguf("builtin:tiny", tmp_path, tokenizer=tok, template="alpaca", outtype="q8_0")
    assert gguf.name == "base.q8_0.gguf"
    assert GGUFReader(gguf).fields["tokenizer.chat_template"].contents() == ALPACA_CHAT_TEMPLATE
    assert ifeval.convert_base_gguf("builtin:tiny", tmp_path, tokenizer=tok) == gguf  # reused
    summary = ifeval.run_ifeval(gguf, tmp_path / "ifeval", max_new_tokens=4, limit=1, n_threads=2, progress=False)
    assert summary["n_prompts"] == 1 and summary["gguf_sha256"] == ifeval.sha256_file(gguf)
