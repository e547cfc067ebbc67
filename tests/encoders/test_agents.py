"""Encoder agents (lmas/encoders/agents.py): LoRA on a BERT-style encoder plus a label head, scored and trained by
hand-checkable rules, in a population next to decoder agents (population=bases)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmas.data.task import Example, Task
from lmas.encoders.agents import EncoderFit, EncoderPopulation, EncoderScorer, encode
from lmas.models.providers import tiny_encoder
from lmas.schema import TrainConfig
from lmas.strategies.base import Strategy
from lmas.training.fit import Experience

ENC = "{_target_:lmas.models.providers.tiny_encoder,hidden_size:32,seed:1}"
MIXED = ["population=bases", f"+population.bases.enc={ENC}", "population.agents={a:model,e:enc}",
         "stream=bbc_class_incremental"]  # fmt: skip


def _pop(agents=("e0", "e1")) -> EncoderPopulation:
    return EncoderPopulation(tiny_encoder(hidden_size=32, num_layers=2, num_heads=2, seed=0), list(agents), seed=0)


def _task() -> Task:
    train = [Example(f"I ate an {w} today", "fruit") for w in ("apple", "orange", "banana", "pear")]
    train += [Example(f"I drove a {w} today", "vehicle") for w in ("car", "truck", "bus", "van")]
    return Task("toy", "classification", train, train[:2] + train[-2:], train, labels=["fruit", "vehicle"])


def test_the_adapters_sit_on_berts_projections_and_an_untrained_head_is_uniform():
    pop = _pop()
    cfg = pop.lora_of("e0")
    assert set(cfg.target_modules) == {"query", "value"} and cfg.task_type == "FEATURE_EXTRACTION"
    assert any(".query.lora_A.e0." in n for n in pop.parameters_of("e0"))
    lp = EncoderScorer(pop, 32).label_logprobs(["e0"], ["a text", "another"], ["x", "y", "z"])
    torch.testing.assert_close(lp, torch.full((1, 2, 3), -math.log(3)))  # w = 0, b = 0 for unknown labels


def test_a_label_score_is_the_mean_pooled_state_times_the_labels_row_plus_its_bias():
    pop = _pop()
    g = torch.Generator().manual_seed(0)
    pop.set_head("e0", ["fruit", "vehicle"], torch.randn(2, 33, generator=g))
    texts = ["I ate an apple", "a much longer text about a red bus"]
    lp = EncoderScorer(pop, 32).label_logprobs(["e0"], texts, ["vehicle", "fruit", "new"])[0]
    enc = pop.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        pop.activate("e0")
        states = pop.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    for i in range(2):
        n = int(enc["attention_mask"][i].sum())
        h = states[i, :n].mean(0)  # by hand: the mean over the text's own tokens, padding left out
        rows = pop.head("e0", ["vehicle", "fruit", "new"])
        scores = torch.stack([h @ rows[j, :32] + rows[j, 32] for j in range(3)])
        torch.testing.assert_close(lp[i], scores.log_softmax(-1), atol=1e-5, rtol=1e-5)


def test_a_fit_learns_a_toy_task_and_the_head_and_adapter_survive_a_save(tmp_path, one_thread):
    pop, task = _pop(), _task()
    scorer = EncoderScorer(pop, 32)
    before = scorer.score("e0", task, "test")
    exp = Experience("e0", task, [(ex, task.kind) for ex in task.train], Strategy(), seed=0)
    losses = []
    torch.manual_seed(0)  # the encoder's dropout draws from the global generator (the loop seeds it per fit)
    result = EncoderFit(pop, TrainConfig(lr=0.05, batch_size=4, epochs=10), 32).fit(
        exp, lambda step, loss: losses.append(loss)
    )
    assert result.steps == 20 == len(result.losses) and losses == result.losses
    first, last = sum(result.losses[:2]) / 2, sum(result.losses[-2:]) / 2  # the first and the last epoch
    assert last < 0.5 * first
    assert scorer.score("e0", task, "test") == 1.0 > before or before == 1.0
    assert scorer.score("e1", task, "test") == before  # the other agent did not move
    path = pop.save_adapter("e0", tmp_path / "e0.safetensors")
    other = _pop()
    other.load_adapter("e0", path)
    lp = EncoderScorer(other, 32).label_logprobs(["e0"], [ex.prompt for ex in task.test], ["fruit", "vehicle"])
    torch.testing.assert_close(lp, scorer.label_logprobs(["e0"], [ex.prompt for ex in task.test], ["fruit", "vehicle"]))


def test_an_encoder_agent_refuses_a_generation_task():
    pop = _pop()
    one = [Example("1+1=", "2")]
    task = Task("gen", "generation", one, one, one)
    with pytest.raises(ValueError, match="'e0' is an encoder agent: it scores classification and raw-text tasks"):
        EncoderScorer(pop, 32).scored("e0", task)
    assert encode(pop, ["x"], 8)["input_ids"].shape[0] == 1


def test_decoder_and_encoder_agents_in_one_run_each_scored_by_its_own_base(fast_overrides, tmp_path, run_lmas):
    from safetensors import safe_open

    out = tmp_path / "run"
    res = run_lmas(fast_overrides + MIXED + ["allocation=broadcast", "topology=master_worker"], out)
    assert {n: a["base"] for n, a in res["agents"].items()} == {"a": "tiny-llama", "e": "tiny-bert"}
    m = res["matrix"]
    assert m["agents"] == ["a", "e", "population"]
    assert m["initial"][0] != m["initial"][1]  # each base's untrained model
    fits = [ev for ev in res["agents"]["e"]["history"] if ev["event"] == "trained"]
    assert [ev["task"] for ev in fits] == ["bbc_business_entertainment", "bbc_politics_sports", "bbc_tech"]
    assert [ev["labels"] for ev in fits] == [2, 2, 1]  # each task's own classes
    with np.load(out / "per_example" / "round002.npz") as f:
        assert {"a/bbc_tech", "e/bbc_tech", "e/bbc_business_entertainment"} <= set(f.files)
    last = max((out / "adapters" / "e").iterdir())
    with safe_open(str(last), "pt") as f:  # the encoder agent's saved version carries its head, every label met
        assert sorted(json.loads(f.metadata()["head_labels"])) == ["business", "entertainment", "politics",
                                                                  "sports", "tech"]  # fmt: skip
    assert "population" in res["metrics"]  # the fused answer over both bases


def test_an_encoder_agent_teaches_a_decoder_student_its_label_distribution(fast_overrides, tmp_path, run_lmas):
    """distill=peers across bases: the decoder student 'a' distils the encoder agent's label distribution once
    'e' has learnt something (round 0: 'a' trains first, nobody teaches); 'e' trains with its task loss alone."""
    extra = ["allocation=broadcast", "distill=peers", "distill.students=[a]"]
    res = run_lmas(fast_overrides + MIXED + extra, tmp_path / "run")
    fits = {n: [ev for ev in res["agents"][n]["history"] if ev["event"] == "trained"] for n in ("a", "e")}
    assert [ev.get("teachers") for ev in fits["a"]] == [None, ["e"], ["e"]]
    assert all("teachers" not in ev for ev in fits["e"])
    assert all(0.0 <= acc <= 1.0 for ev in fits["a"][1:] for acc in ev["external_teacher_accuracy"]["e"].values())


@pytest.mark.parametrize(
    ("extra", "bad", "why"),
    [
        (["strategy=ewc"], "strategy._target_", "encoder agents (e) train with the data-level strategies"),
        (["stream=default"], "stream.tasks", "encoder agents (e) score classification tasks, and raw text by"),
        (["stream=bbc_pretraining"], "stream.tasks", "not ['text_business', 'text_sports', 'text_tech'] (raw text"),
        (["stream=bbc_encoder_pretraining"], "stream.tasks", "are scored by an encoder's masked LM, which agents a"),
        (["distill=minilm"], "distill.students", "encoder agents (e) train without a distillation term"),
        (["distill=peers", "distill.students=[a]", "stream=default"], "distill.teachers",
         "teach label distributions only, and tasks ['math'] would be distilled token by token"),
    ],
)
def test_encoder_agents_refuse_what_reads_a_causal_lm(extra, bad, why, compose):
    from lmas.config import ConfigError, validate

    with pytest.raises(ConfigError) as err:
        validate(compose(["model=tiny", *MIXED, *extra]))
    assert any(p.startswith(bad) and why in p for p in err.value.problems), err.value.problems


def test_agents_all_on_an_encoder_refuse_adapter_transfers(compose):
    from lmas.config import ConfigError, validate

    cfg = compose(["model=encoder", "population=bases", "population.agents=2", "stream=bbc_class_incremental",
                   "transfer=merge"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"encoder agents \(agent0, agent1\) keep a label head that adapters"):
        validate(cfg)
    validate(compose(["model=encoder", "population=bases", "population.agents=2", "stream=bbc_class_incremental"]))


def test_an_encoder_model_needs_population_bases(compose):
    from lmas.config import ConfigError, validate

    with pytest.raises(ConfigError, match="population._target_=.*is an encoder: its agents .* need population=bases"):
        validate(compose(["model=encoder", "stream=bbc_class_incremental"]))


TEXTS = [
    "Shares rose in London. The bank held its rates. Investors were calm.",
    "The striker scored twice. The coach praised the team! Fans sang until late.",
    "A new phone was launched. Its battery lasts two days? Reviewers liked the camera.",
    "Oil prices fell again. Traders sold their stock. Markets closed lower.",
]


def _raw(metric: str = "pseudo_perplexity") -> Task:
    rows = [Example("", t) for t in TEXTS]
    return Task("raw", "lm", rows, rows[:1], rows[:2], metric=metric)


def test_fresh_agents_share_mlm_heads_whose_decoder_is_the_word_embeddings():
    pop = _pop()
    h0, h1 = pop.mlm_heads("e0"), pop.mlm_heads("e1")
    assert h0 is not h1
    for (name, p0), p1 in zip(h0.state_dict().items(), h1.state_dict().values(), strict=True):
        torch.testing.assert_close(p0, p1, msg=name)  # the same fresh heads: an untrained agent is the base
    emb = pop.base.model.get_input_embeddings().weight
    assert all(p.data_ptr() != emb.data_ptr() for p in h0.parameters())  # tied, not owned (and not trained)
    h = torch.randn(3, 32)
    want = F.layer_norm(F.gelu(h0.dense(h)), (32,), h0.norm.weight, h0.norm.bias, eps=1e-12)  # BertConfig eps
    torch.testing.assert_close(h0.predictions(h), want @ emb.T + h0.bias)


@pytest.mark.parametrize("metric", ["pseudo_perplexity", "masked_accuracy"])
def test_raw_text_is_scored_with_every_token_masked_once_as_by_hand(metric, one_thread):
    pop = _pop()
    heads = pop.mlm_heads("e0")
    with torch.no_grad():
        heads.bias.copy_(torch.randn(heads.bias.shape, generator=torch.Generator().manual_seed(1)))
    got = EncoderScorer(pop, 32, batch_size=5).scored("e0", _raw(metric))
    nll, hits, tokens = [], [], []
    pop.activate("e0")
    for text in TEXTS[:2]:  # the test split
        ids = pop.tokenizer(text)["input_ids"]
        n = h = t = 0.0
        for pos in range(1, len(ids) - 1):  # every token but [CLS] and [SEP], one copy each
            masked = torch.tensor([ids[:pos] + [pop.tokenizer.mask_token_id] + ids[pos + 1 :]])
            with torch.no_grad():
                state = pop.model(input_ids=masked, attention_mask=torch.ones_like(masked)).last_hidden_state[0, pos]
                logp = heads.predictions(state).log_softmax(-1)
            n, h, t = n - logp[ids[pos]].item(), h + float(logp.argmax().item() == ids[pos]), t + 1
        nll.append(n), hits.append(h), tokens.append(t)
    first = nll if metric == "pseudo_perplexity" else hits
    np.testing.assert_allclose(got.per_example, np.array([first, tokens]).T, rtol=1e-5)
    want = math.exp(sum(nll) / sum(tokens)) if metric == "pseudo_perplexity" else sum(hits) / sum(tokens)
    assert got.value == pytest.approx(want, rel=1e-5)


def test_an_encoder_agent_refuses_raw_text_scored_by_a_causal_perplexity():
    with pytest.raises(ValueError, match="scores raw text by pseudo_perplexity or masked_accuracy, and task 'raw'"):
        EncoderScorer(_pop(), 32).scored("e0", _raw("perplexity"))


def test_mlm_nsp_fit_lowers_the_pseudo_perplexity_and_the_heads_survive_a_save(tmp_path, one_thread):
    pop, task = _pop(), _raw()
    scorer = EncoderScorer(pop, 32)
    train = dataclasses.replace(task, test=task.train)
    before = scorer.score("e0", train)
    exp = Experience("e0", task, [(ex, task.kind) for ex in task.train], Strategy(), seed=0)
    torch.manual_seed(0)
    result = EncoderFit(pop, TrainConfig(lr=0.01, batch_size=4, epochs=30), 32).fit(exp, lambda step, loss: None)
    assert result.steps == 60 and result.info["pairs"] == 8  # 2 pairs per text, 2 batches per epoch
    assert result.info["mlm_loss"] > 0 and result.info["nsp_loss"] > 0
    after = scorer.score("e0", train)
    assert after < 0.5 * before, (before, after)
    assert scorer.score("e1", train) == pytest.approx(before)  # the other agent's heads and adapter did not move
    other = _pop()
    other.load_adapter("e0", pop.save_adapter("e0", tmp_path / "e0.safetensors"))
    assert EncoderScorer(other, 32).score("e0", train) == pytest.approx(after, rel=1e-6)


TINY_ENCODER = ["model=tiny_encoder"]


def test_an_encoder_agent_pretrains_on_raw_text_in_a_run(tmp_path, run_lmas):
    """experiment=encoder_pretraining on a tiny encoder: MLM + NSP per topic, pseudo-perplexity in the matrix and
    the causal preset's CL metrics."""
    fast = ["debug=fast", "logger=csv", f"paths.output_dir={tmp_path}", "experiment=encoder_pretraining"]
    res = run_lmas([*fast, *TINY_ENCODER], tmp_path / "run")
    assert set(res["matrix"]["metrics"].values()) == {"pseudo_perplexity"}
    fits = [ev for ev in res["agents"]["agent0"]["history"] if ev["event"] == "trained"]
    assert [ev["task"] for ev in fits] == ["text_business", "text_sports", "text_tech"]
    assert all(ev["mlm_loss"] > 0 and ev["nsp_loss"] > 0 for ev in fits)
    assert {"avg_ppl", "ppl_forgetting", "ppl_bwt"} <= set(res["metrics"]["agent0"])
    with np.load(tmp_path / "run" / "per_example" / "round002.npz") as f:
        assert f["agent0/text_tech"].shape == (6, 2)  # per text: NLL sum, tokens (debug=fast: 6 test texts)


def test_a_minilm_agent_learns_bbc_topics(one_thread):
    """The packaged all-MiniLM-L6-v2 as an encoder agent: 2 epochs of 40 BBC texts lift its test accuracy from
    the untrained head's (every label scored 0: the first label wins) to well above chance."""
    from lmas.data.sources import bbc_topics
    from lmas.models.providers import encoder

    pop = EncoderPopulation(encoder(), ["m"], seed=0)
    task = bbc_topics(name="bbc", topics=["business", "sports", "tech"], n_train=40, n_val=8, n_test=30, max_chars=200)
    scorer = EncoderScorer(pop, 96)
    before = scorer.score("m", task)
    exp = Experience("m", task, [(ex, task.kind) for ex in task.train], Strategy(), seed=0)
    EncoderFit(pop, TrainConfig(lr=1e-2, batch_size=8, epochs=2), 96).fit(exp, lambda step, loss: None)
    after = scorer.score("m", task)
    assert before == pytest.approx(1 / 3, abs=0.15) and after >= 0.8, (before, after)


@pytest.mark.slow
def test_a_minilm_agent_pretrained_on_raw_text_lowers_its_held_out_pseudo_perplexity(one_thread):
    """The packaged MiniLM as an encoder agent: its MLM/NSP heads start untrained (the checkpoint has none), and one
    epoch of MLM + NSP on 64 business texts (LoRA + heads) lowers the pseudo-perplexity of held-out ones."""
    from lmas.data.sources import bbc_text
    from lmas.models.providers import encoder

    pop = EncoderPopulation(encoder(), ["m"], seed=0)
    task = bbc_text("text_business", ["business"], n_train=64, n_val=4, n_test=8, max_chars=300,
                    metric="pseudo_perplexity")  # fmt: skip
    scorer = EncoderScorer(pop, 96)
    before = scorer.score("m", task)
    exp = Experience("m", task, [(ex, task.kind) for ex in task.train], Strategy(), seed=0)
    torch.manual_seed(0)
    EncoderFit(pop, TrainConfig(lr=1e-3, batch_size=8, epochs=1), 96).fit(exp, lambda step, loss: None)
    after = scorer.score("m", task)
    assert after < 0.2 * before, (before, after)


def test_a_one_label_experience_learns_nothing_and_says_so(caplog, one_thread):
    pop = _pop()
    rows = [Example(f"I ate an {w}", "fruit") for w in ("apple", "pear")]
    task = Task("one", "classification", rows, rows, rows, labels=["fruit"])
    before = {k: v.clone() for k, v in pop.parameters_of("e0").items()}
    exp = Experience("e0", task, [(ex, task.kind) for ex in rows], Strategy(), seed=0)
    with caplog.at_level("WARNING", logger="lmas.encoders.agents"):
        result = EncoderFit(pop, TrainConfig(lr=0.1, batch_size=2, epochs=2), 32).fit(exp, lambda step, loss: None)
    assert "task 'one' has one label ('fruit')" in caplog.text
    assert result.losses == [0.0, 0.0]  # log_softmax over one label
    assert all(torch.equal(before[k], v) for k, v in pop.parameters_of("e0").items())
