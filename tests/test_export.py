"""Export: LoRA merge (against PEFT), GGUF conversion checked in llama.cpp, templates, Modelfile, failures.

Test base model: the tiny preset's shape (2-layer Llama, hidden 64, SmolLM2's real tokenizer) with
its embedding scaled from std 0.02 to 0.2. At std 0.02 every logit lies within about +-1 of the
others (the tied head maps a norm-8 hidden state onto norm-0.16 rows), so top-1 is decided by
rounding noise and a top-1 agreement figure means nothing; at 0.2 the logits are peaked enough to
compare. It is saved in several shards, in bf16 (as the presets) and in fp32 (for an exact check).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from grit_study.data import build_study_data, format_prompt, merged_instruction
from grit_study.export import (ALPACA_CHAT_TEMPLATE, ExportError, deploy_ollama, eval_loss_gguf, eval_loss_hf,
                               export_gguf, gguf_logits, load_gguf, parse_modelfile)
from grit_study.merge import MergeError, merge_lora, read_adapter
from grit_study.presets import LORA_TARGETS_LLAMA
from go_template import render_go_template
from grit_study.models import tiny_dir

TARGETS = list(LORA_TARGETS_LLAMA)
ROWS = [  # braces, quotes, newlines and an input: the templates must not touch any of them
    {"instruction": "Reverse the order of the words.", "input": "apple river stone", "output": "stone river apple"},
    {"instruction": 'Format as JSON with keys "item" and "color": the {{ x }} is red.', "input": "", "output": "{}"},
    {"instruction": "Line one\n\nline two {% raw %} ' \\ end", "input": "a\nb", "output": "ok"},
]


def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir())


def _peaked_base(folder: Path, dtype) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=True, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(10.0)
        # HF zeroes the padding row at init, and pad == EOS here: with a tied head the EOS logit would be
        # 0 whatever the hidden state. A trained model's EOS row is not zero; give it a random one.
        model.model.embed_tokens.weight[tok.eos_token_id].normal_(0, 0.2)
    model.to(torch.bfloat16).to(dtype).save_pretrained(folder, max_shard_size="100KB")  # bf16 values in both
    tok.save_pretrained(folder)
    assert len(list(folder.glob("*.safetensors"))) >= 3
    return folder


def _peft(base: Path, *, r=4, alpha=8, rslora=False, alpha_pattern=None, name="study", seed=1):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, alpha_pattern=alpha_pattern or {},
                     target_modules=TARGETS, lora_dropout=0.0)
    torch.manual_seed(seed)
    peft = get_peft_model(model, cfg, adapter_name=name)
    with torch.no_grad():  # a fresh LoRA has B = 0 and merges to nothing: make B non-zero
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return peft.eval()


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {"bf16": _peaked_base(root / "bf16", torch.bfloat16), "fp32": _peaked_base(root / "fp32", torch.float32)}


@pytest.fixture(scope="module")
def data():
    return build_study_data(_tokenizer(), source="synthetic", num_examples=40, val_size=8, max_seq_length=128, data_seed=0)


def _craft_eos_rules(peft, rules: list[tuple[int, int]], name="study", c=0.5, g=5.0) -> None:
    """Overwrite the last layer's MLP adapters with hand-made bigram rules "current token a -> next b".

    Rule i uses intermediate unit 100+i: gate and up read the direction of a's embedding, so their
    product is ~64x larger when the current token is a than for any other token; down writes b's
    embedding direction into the residual, which the tied head turns into a top logit for b. This
    stands in for training (a few steps cannot teach the random tiny model anything): the merged
    model then answers every Alpaca prompt with "OK" and EOS, through ordinary LoRA weights.
    """
    E = peft.get_input_embeddings().weight.detach().float().clone()
    mlp = peft.base_model.model.model.layers[-1].mlp
    with torch.no_grad():
        for proj in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            proj.lora_A[name].weight.zero_()
            proj.lora_B[name].weight.zero_()
        for i, (a, b) in enumerate(rules):
            for proj in (mlp.gate_proj, mlp.up_proj):
                proj.lora_A[name].weight[i] = E[a] / E[a].norm()
                proj.lora_B[name].weight[100 + i, i] = c
            mlp.down_proj.lora_A[name].weight[i, 100 + i] = 1.0
            mlp.down_proj.lora_B[name].weight[:, i] = g * E[b] / E[b].norm()


OK_TOKEN = 13663  # "OK" in SmolLM2's vocabulary; 198 is "\n", the last token of every Alpaca prompt


@pytest.fixture(scope="module")
def exported(bases, tmp_path_factory):
    """A live PeftModel (non-default adapter name) exported to GGUF q8_0 with the Alpaca template."""
    tok = _tokenizer()
    assert tok.convert_ids_to_tokens([198, OK_TOKEN]) == ["Ċ", "OK"]
    peft = _peft(bases["bf16"])
    _craft_eos_rules(peft, [(198, OK_TOKEN), (OK_TOKEN, tok.eos_token_id)])
    return export_gguf(peft, str(bases["bf16"]), tmp_path_factory.mktemp("export"), tokenizer=_tokenizer(),
                       template="alpaca", outtype="q8_0", model_name="tiny-test")


def _logits(model, examples):
    with torch.no_grad():
        return [model(torch.tensor([e["input_ids"]])).logits[0] for e in examples]


# ----------------------------------------------------------------------------- merge

@pytest.mark.slow
def test_merged_model_logits_equal_peft_model(bases, data, tmp_path):
    from transformers import AutoModelForCausalLM

    peft = _peft(bases["fp32"], r=4, alpha=8)
    peft.save_pretrained(tmp_path / "adapter")
    merged_dir = merge_lora(bases["fp32"], tmp_path / "adapter", tmp_path / "merged", adapter_name="study")
    assert json.loads((merged_dir / "model.safetensors.index.json").read_text())["weight_map"]
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    examples = data.val[:4]
    with peft.disable_adapter():
        base_logits = _logits(peft, examples)
    for p, m, b in zip(_logits(peft, examples), _logits(merged, examples), base_logits):
        torch.testing.assert_close(m, p, rtol=1e-4, atol=1e-4)
        assert (p - b).abs().max() > 0.5  # the adapters really change the model


def test_merged_bf16_weights_equal_peft_merge_and_unload(bases, tmp_path):
    from safetensors.torch import load_file

    # rsLoRA and a per-module alpha: the scale is alpha/sqrt(r), 16/2 for v_proj and 8/2 elsewhere
    peft = _peft(bases["bf16"], r=4, alpha=8, rslora=True, alpha_pattern={"v_proj": 16}, name="default")
    peft.save_pretrained(tmp_path / "adapter")
    deltas, _ = read_adapter(tmp_path / "adapter")
    assert deltas["model.layers.0.self_attn.v_proj.weight"].scale == 8.0
    assert deltas["model.layers.0.self_attn.q_proj.weight"].scale == 4.0
    merge_lora(bases["bf16"], tmp_path / "adapter", tmp_path / "merged")
    ref = {k: v.to(torch.bfloat16) for k, v in peft.merge_and_unload().state_dict().items()}
    mine, base = {}, {}
    for f in (tmp_path / "merged").glob("*.safetensors"):
        mine.update(load_file(f))
        base.update(load_file(bases["bf16"] / f.name))
    assert set(mine) == set(base)
    for name, w in mine.items():
        assert w.dtype == torch.bfloat16
        if name in deltas:  # fp32 sums in another order may round to the neighbouring bf16 value
            torch.testing.assert_close(w.float(), ref[name].float(), rtol=2 ** -7, atol=1e-7)
            assert (w == ref[name]).float().mean() > 0.99
            assert not torch.equal(w, base[name])
        else:
            assert torch.equal(w, base[name])


def test_merge_errors_say_what_to_do(bases, tmp_path):
    from safetensors.torch import load_file, save_file

    with pytest.raises(MergeError, match="does not exist"):
        merge_lora(bases["bf16"], tmp_path / "missing", tmp_path / "out")
    _peft(bases["bf16"], name="default").save_pretrained(tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    good = load_file(weights)
    # an adapter trained on a deeper model: its layer-7 weights do not exist in this base
    save_file({k.replace("layers.1.", "layers.7."): v for k, v in good.items()}, weights)
    with pytest.raises(MergeError, match=r"absent.*layers\.7.*pass the base model"):
        merge_lora(bases["bf16"], tmp_path / "adapter", tmp_path / "out")
    # an adapter trained on a wider model: lora_B of up_proj has 160 output rows, the base 128
    save_file({k: (torch.zeros(160, v.shape[1]) if "up_proj.lora_B" in k else v) for k, v in good.items()}, weights)
    with pytest.raises(MergeError, match=r"shape mismatch.*\(128, 64\).*\(160, 64\)"):
        merge_lora(bases["bf16"], tmp_path / "adapter", tmp_path / "out")
    save_file(good, weights)
    # a base shard that breaks in the middle of the merge: nothing finished-looking is left
    broken = tmp_path / "broken_base"
    broken.mkdir()
    for f in bases["bf16"].iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    last = sorted(broken.glob("model-*.safetensors"))[-1]
    last.write_bytes(last.read_bytes()[:-100])
    with pytest.raises(Exception):
        merge_lora(broken, tmp_path / "adapter", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "broken_base"]


# ----------------------------------------------------------------------------- export outputs

def test_export_refuses_unwritable_output_folder(bases, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ExportError, match="cannot write to output folder.*pass an output_dir"):
        export_gguf(tmp_path / "adapter", str(bases["bf16"]), blocker / "export", tokenizer=_tokenizer())
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(ExportError, match="cannot write"):
            export_gguf(tmp_path / "adapter", str(bases["bf16"]), ro, tokenizer=_tokenizer())


def test_go_template_renderer_follows_go_semantics():
    # expectations written from text/template's documented rules, not from the renderer
    assert render_go_template("{{ if .A }}x{{ else }}y{{ end }}", {"A": ""}) == "y"
    assert render_go_template("{{ if .A }}x{{ else }}y{{ end }}", {"A": "1"}) == "x"
    assert render_go_template("a  {{- .A -}}  \n b", {"A": "X"}) == "aXb"
    assert render_go_template("{{ if .A }}{{ if .B }}1{{ end }}2{{ end }}3", {"A": "a"}) == "23"
    assert render_go_template("<{{ .Prompt }}>{{ .Response }}</s>", {"Prompt": "{{ .A }}"}) == "<{{ .A }}>"
    assert render_go_template("{{ .Prompt }}{{ .Response }}</s>", {"Prompt": "p", "Response": "r"},
                              generation=False) == "pr</s>"
    with pytest.raises(ValueError, match="outside the supported subset"):
        render_go_template("{{ range .Messages }}{{ end }}", {})


def test_training_formatter_gguf_template_and_modelfile_render_the_same_prompt(exported):
    import jinja2
    from gguf import GGUFReader
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    tok = _tokenizer()
    fields = GGUFReader(exported.gguf_path).fields
    gguf_template = fields["tokenizer.chat_template"].contents()
    assert gguf_template == ALPACA_CHAT_TEMPLATE
    assert int(fields["tokenizer.ggml.eos_token_id"].contents()) == tok.eos_token_id == 2
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"  # byte-level BPE, as the HF tokenizer
    modelfile = parse_modelfile(exported.modelfile_path.read_text())
    assert modelfile["FROM"] == f"./{exported.gguf_path.name}" and exported.gguf_path.is_file()
    assert modelfile["stop"] == ["<|im_end|>"]
    envs = [jinja2.Environment(), ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)]
    for row in ROWS:
        expected = format_prompt(row, tok, "alpaca")
        messages = [{"role": "user", "content": merged_instruction(row)}]
        for env in envs:
            assert env.from_string(gguf_template).render(messages=messages, add_generation_prompt=True,
                                                         eos_token="<|im_end|>", bos_token="<|im_start|>") == expected
        assert render_go_template(modelfile["TEMPLATE"], {"System": modelfile["SYSTEM"],
                                                          "Prompt": merged_instruction(row)}) == expected
    merged_tok = type(tok).from_pretrained(exported.merged_dir)
    assert merged_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == expected
    # an earlier turn ends with EOS in both, as the training text does
    two = [*messages, {"role": "assistant", "content": "R"}, {"role": "user", "content": "Q2"}]
    jinja_two = envs[1].from_string(gguf_template).render(messages=two, add_generation_prompt=True,
                                                          eos_token="<|im_end|>")
    # Ollama renders an earlier turn whole (with System only in the first) and cuts the last at .Response
    go_two = (render_go_template(modelfile["TEMPLATE"], {"System": modelfile["SYSTEM"], "Prompt": two[0]["content"],
                                                         "Response": "R"}, generation=False)
              + render_go_template(modelfile["TEMPLATE"], {"Prompt": "Q2"}))
    assert go_two == jinja_two


# ----------------------------------------------------------------------------- llama.cpp runtime

@pytest.mark.runtime
@pytest.mark.slow
def test_gguf_q8_0_agrees_with_merged_model(exported, data):
    from transformers import AutoModelForCausalLM

    tok = _tokenizer()
    llm = load_gguf(exported.gguf_path, n_ctx=256)
    try:
        # llama.cpp tokenizes the prompt text exactly as the training tokenizer did
        for row in ROWS + data.val_rows[:3]:
            text = format_prompt(row, tok, "alpaca") + row["output"] + "<|im_end|>"
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text)["input_ids"]
        merged = AutoModelForCausalLM.from_pretrained(exported.merged_dir, dtype=torch.float32)
        agree = total = 0
        for ex, hf in zip(data.val, _logits(merged, data.val)):
            top_gguf = gguf_logits(llm, ex["input_ids"]).argmax(-1)
            agree += int((hf.argmax(-1).numpy() == top_gguf).sum())
            total += len(top_gguf)
    finally:
        llm.close()
    print(f"\nq8_0 top-1 agreement with the merged bf16 model: {agree}/{total} = {agree / total:.4f}")
    assert agree / total >= 0.98
    hf_loss, gguf_loss = eval_loss_hf(merged, data.val, 4), eval_loss_gguf(exported.gguf_path, data.val)
    print(f"response eval loss: merged HF {hf_loss['loss']:.4f}, GGUF q8_0 {gguf_loss['loss']:.4f}")
    assert hf_loss["tokens"] == gguf_loss["tokens"] == sum(sum(l != -100 for l in e["labels"]) for e in data.val)
    assert abs(hf_loss["loss"] - gguf_loss["loss"]) < 0.02 * hf_loss["loss"]


def test_eval_loss_hf_is_token_weighted_response_cross_entropy(bases, data):
    from transformers import AutoModelForCausalLM

    from grit_study.data import PadCollator

    model = AutoModelForCausalLM.from_pretrained(bases["fp32"], dtype=torch.float32)
    examples = data.val[:5]
    with torch.no_grad():  # HF's own loss over one batch holding every example is the token-weighted mean
        ref = model(**PadCollator(pad_token_id=2)(examples)).loss.item()
    got = eval_loss_hf(model, examples, batch_size=2)  # uneven batches: a per-batch mean would differ
    assert got["loss"] == pytest.approx(ref, rel=1e-5)


def _random_adapter(base: Path, folder: Path, *, r=4, alpha=8, std=0.01, seed=0) -> Path:
    """A PEFT-format LoRA folder for ``base`` written directly (no model load): A and B random, B small."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    g, lora = torch.Generator().manual_seed(seed), {}
    for shard in sorted(base.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                if name.endswith(".weight") and name.split(".")[-2] in TARGETS:
                    out, inp = f.get_slice(name).get_shape()
                    key = "base_model.model." + name[:-len(".weight")]
                    lora[f"{key}.lora_A.weight"] = torch.randn(r, inp, generator=g) / inp ** 0.5
                    lora[f"{key}.lora_B.weight"] = torch.randn(out, r, generator=g) * std
    folder.mkdir()
    save_file(lora, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": alpha,
                                                            "target_modules": TARGETS}))
    return folder


@pytest.mark.runtime
@pytest.mark.slow
def test_greedy_generation_in_llama_cpp_ends_with_eos(exported, bases, data):
    """The merged adapter (see _craft_eos_rules) answers "OK" then EOS; llama.cpp must produce and stop at
    that EOS from the prompt text. The base model alone never emits EOS, so the EOS comes through the export."""
    from transformers import AutoModelForCausalLM

    tok = _tokenizer()
    budget = 32
    base = AutoModelForCausalLM.from_pretrained(bases["bf16"], dtype=torch.float32)
    llm = load_gguf(exported.gguf_path, n_ctx=256)
    try:
        assert llm.token_eos() == tok.eos_token_id
        for row in data.val_rows[:2]:
            prompt = format_prompt(row, tok, "alpaca")
            ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
            generated = []
            for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
                generated.append(token)
                if llm.token_eos() == token or len(generated) == budget:
                    break
            assert generated == [OK_TOKEN, tok.eos_token_id]
            out = llm.create_completion(prompt, max_tokens=budget, temperature=0.0)["choices"][0]
            assert (out["text"], out["finish_reason"]) == ("OK", "stop")
            with torch.no_grad():
                plain = base.generate(torch.tensor([ids]), max_new_tokens=budget, do_sample=False,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            assert tok.eos_token_id not in plain[0, len(ids):].tolist()
    finally:
        llm.close()


@pytest.mark.runtime
@pytest.mark.slow
def test_smollm2_chat_export_takes_under_a_minute(tmp_path):
    """The acceptance figure: the CPU preset's model (135M, bf16) exported with a non-zero adapter and the
    tokenizer's own ChatML template; llama.cpp renders the GGUF's template to the training prompt."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from transformers import AutoTokenizer

    from grit_study.models import smollm2_dir

    base = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(base)
    adapter = _random_adapter(base, tmp_path / "adapter")
    t0 = time.perf_counter()
    result = export_gguf(adapter, "builtin:smollm2-135m", tmp_path / "export", tokenizer=tok, template="chat")
    seconds = time.perf_counter() - t0
    print(f"\nsmollm2-135m export: {seconds:.1f} s {result.seconds}")
    assert seconds < 60
    modelfile = parse_modelfile(result.modelfile_path.read_text())
    assert modelfile["stop"] == ["<|im_end|>"] and "SYSTEM" not in modelfile
    llm = load_gguf(result.gguf_path, n_ctx=256)
    try:
        assert llm.token_eos() == tok.eos_token_id
        formatter = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token="<|im_end|>",
                                        bos_token="<|im_start|>", add_generation_prompt=True)
        for row in ROWS:
            expected = format_prompt(row, tok, "chat")
            content = merged_instruction(row)
            assert formatter(messages=[{"role": "user", "content": content}]).prompt == expected
            assert render_go_template(modelfile["TEMPLATE"], {"Prompt": content}) == expected
            assert llm.tokenize(expected.encode(), add_bos=False, special=True) == tok(expected)["input_ids"]
    finally:
        llm.close()


# ----------------------------------------------------------------------------- interruption, deployment

@pytest.mark.slow
def test_interrupted_export_leaves_no_finished_file(bases, tmp_path):
    _peft(bases["bf16"], name="default").save_pretrained(tmp_path / "adapter")
    out = tmp_path / "export"
    script = ("import sys; from transformers import AutoTokenizer; from grit_study.export import export_gguf; "
              "export_gguf(sys.argv[1], sys.argv[2], sys.argv[3], tokenizer=AutoTokenizer.from_pretrained(sys.argv[2]))")
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "adapter"), str(bases["bf16"]), str(out)],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    converter_seen = False
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        if children.exists() and children.read_text().split():
            converter_seen = True  # the merge is done and convert_hf_to_gguf is running: interrupt now
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert converter_seen, "the export finished or failed before it could be interrupted"
    names = sorted(p.name for p in out.iterdir())
    assert "merged" in names  # renamed only once complete
    assert not [n for n in names if n.endswith(".gguf") or n == "Modelfile"], names
    assert all(n == "merged" or n.startswith(".") for n in names), names


def test_deploy_ollama_without_binary_prints_the_commands(exported, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no ollama here, nor anywhere on this machine
    report = deploy_ollama(exported, "grit-study-tiny", "Say 'hi' $(rm -rf /)")
    assert report["deployed"] is False
    printed = capsys.readouterr().out
    create = ["ollama", "create", "grit-study-tiny", "-f", str(exported.modelfile_path)]
    run = ["ollama", "run", "grit-study-tiny", "Say 'hi' $(rm -rf /)"]
    assert [shlex.split(c) for c in report["commands"]] == [create, run]  # quoted: safe to paste into a shell
    assert all(c in printed for c in report["commands"])
    with pytest.raises(ValueError, match="Ollama model name"):
        deploy_ollama(exported, "bad name; rm", "x")
