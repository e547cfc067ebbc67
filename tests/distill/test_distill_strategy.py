"""The Distill strategy on the tiny model: cached and live teachers agree, the student moves
towards its teachers, token-level KD on generation, teacher sets, and the MiniLM teacher."""

from __future__ import annotations

import math

import pytest
import torch

from lmas.data.sources import bbc_topics
from lmas.data.task import Example, Task
from lmas.data.stream import Stream
from lmas.distill.strategy import Distill
from lmas.loop import ContinualLoop, EvalConfig, TrainConfig
from lmas.lm.encoding import PromptEncoder, collate
from lmas.lm.likelihood import answer_logits, label_logprobs
from lmas.population.allocation import Explicit
from lmas.population.population import Population


@pytest.fixture(scope="module")
def news():
    return bbc_topics("news", topics=["sports", "tech"], n_train=8, n_val=4, n_test=4, max_chars=60)


def _randomise(pop, agents, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pop.model.named_parameters():
            if "lora_B" in n and any(f".{a}." in n for a in agents):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    for a in agents:
        pop.agents[a].history.append({"round": -1, "event": "trained", "task": "news"})


class Recorder(Distill):
    """Records the distillation term of every step."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.kd: list[float] = []

    def loss_terms(self, module, batch, out):
        terms = super().loss_terms(module, batch, out)
        if "kd" in terms:
            self.kd.append(terms["kd"].item())
        return terms


def _train_student(tiny_base, task, tmp_path, **distill):
    pop = Population(tiny_base, agents=["t1", "t2", "student"], lora={"r": 4, "alpha": 8}, seed=0)
    _randomise(pop, ["t1", "t2"])
    strategy = Recorder(**distill)
    loop = ContinualLoop(pop, Stream("s", [task]), strategy, tmp_path, seed=0,
                         train=TrainConfig(lr=5e-3, max_steps=4, batch_size=4, epochs=2),
                         eval=EvalConfig(batch_size=8, initial=False), allocation=Explicit([{"student": task.name}]),
                         progress=False, save_adapters=False)
    loop.run()
    return pop, strategy


def test_cached_and_live_teachers_give_the_same_losses(tiny_base, news, tmp_path):
    _, cached = _train_student(tiny_base, news, tmp_path / "c", cache=True, temperature=2.0)
    from lmas.models.providers import tiny

    fresh = tiny(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=0)
    _, live = _train_student(fresh, news, tmp_path / "l", cache=False, temperature=2.0)
    assert len(cached.kd) == 4 and all(v > 0 for v in cached.kd)
    assert live.kd == pytest.approx(cached.kd, rel=1e-4)


class _Module:
    """The pieces of IncrementalLM the strategy reads."""

    def __init__(self, pop, enc, task, agent="student"):
        self.population, self.agent, self.encoder, self.net = pop, agent, enc, pop.model
        self.examples = [(ex, task.kind) for ex in task.train]
        items = [enc.encode_example(ex, task.kind) for ex in task.train]
        self.batch = {**collate(items, enc.pad_id), "index": torch.arange(len(task.train))}

    def out(self):
        return dict(zip(("logits", "targets", "rows"), answer_logits(self.net, self.batch)))


def test_distillation_alone_pulls_the_student_towards_the_teacher(tiny_base, news):
    pop = Population(tiny_base, agents=["teacher", "student"], lora={"r": 4, "alpha": 8}, seed=0)
    _randomise(pop, ["teacher"])
    enc = PromptEncoder(pop.tokenizer, 64)
    prompts = [ex.prompt for ex in news.train]

    def dist(agent):
        pop.activate(agent)
        pop.model.eval()
        return label_logprobs(pop.model, enc, prompts, news.labels).softmax(-1)

    teacher = dist("teacher")
    gap_before = (dist("student") - teacher).abs().sum().item()
    strategy = Distill(teachers=["teacher"], temperature=1.0)
    module = _Module(pop, enc, news)
    strategy.before_task(module, news)
    params = [p for p in pop.model.parameters() if p.requires_grad]
    assert params and all(".student." in n for n, p in pop.model.named_parameters() if p.requires_grad)
    opt = torch.optim.Adam(params, lr=2e-2)
    pop.model.train()
    for _ in range(20):
        opt.zero_grad()
        strategy.loss_terms(module, module.batch, module.out())["kd"].backward()
        opt.step()
    gap_after = (dist("student") - teacher).abs().sum().item()
    assert gap_after < 0.5 * gap_before


def test_one_token_labels_reuse_the_task_pass_and_match_separate_label_scoring(tiny_base, news):
    """BBC's labels are one token each: the student's label distribution comes from the task-loss
    logits (no second pass) and equals label_logprobs' prompt + label scoring, gradients included."""
    pop = Population(tiny_base, agents=["teacher", "student"], lora={"r": 4, "alpha": 8}, seed=0)
    _randomise(pop, ["teacher", "student"])
    enc = PromptEncoder(pop.tokenizer, 64)
    module = _Module(pop, enc, news)
    strategy = Distill(teachers=["teacher"], temperature=2.0, loss="jsd")
    strategy.before_task(module, news)
    assert strategy._label_ids is not None and len(strategy._label_ids) == len(news.labels)
    pop.model.train()
    params = [p for p in pop.model.parameters() if p.requires_grad]

    def kd_and_grads():
        pop.model.zero_grad()
        kd = strategy.loss_terms(module, module.batch, module.out())["kd"]
        kd.backward()
        return kd.item(), torch.cat([p.grad.flatten() for p in params])

    fast, fast_grad = kd_and_grads()
    strategy._label_ids = None  # force the separate prompt + label pass
    slow, slow_grad = kd_and_grads()
    assert fast > 0 and fast == pytest.approx(slow, rel=1e-5)
    assert torch.allclose(fast_grad, slow_grad, rtol=1e-4, atol=1e-7)


def test_token_level_distillation_on_a_generation_task(tiny_base, tmp_path):
    rows = [Example(f"{a} + {b} =", str(a + b)) for a in range(4) for b in range(3)]
    task = Task("add", "generation", rows[:8], rows[8:10], rows[10:])
    _, strategy = _train_student(tiny_base, task, tmp_path, cache=True, top_k=8, loss="jsd")
    assert strategy.kd and all(0 < v for v in strategy.kd)
    # the cache holds float16 probabilities and uint16 token ids (vocabulary 49,152): 8 x (2 + 2) bytes per token
    assert strategy.fit_info()["teacher_cache_bytes_per_token"] == 32.0


def test_a_skew_kl_trains_a_student_on_a_generation_task(tiny_base, tmp_path):
    rows = [Example(f"{a} + {b} =", str(a + b)) for a in range(4) for b in range(3)]
    task = Task("add", "generation", rows[:8], rows[8:10], rows[10:])
    _, strategy = _train_student(tiny_base, task, tmp_path, cache=True, top_k=8, loss="skew_rkl", skew=0.2)
    assert len(strategy.kd) == 4 and all(0 < v < -math.log(0.2) * 4 for v in strategy.kd)  # T^2 = 4 times the bound
    with pytest.raises(ValueError, match=r"distill\.beta=2"):
        Distill(loss="gjsd", beta=2)


def test_on_policy_distillation_scores_the_students_own_samples_with_live_teachers(tiny_base, tmp_path):
    rows = [Example(f"{a} + {b} =", str(a + b)) for a in range(4) for b in range(3)]
    task = Task("add", "generation", rows[:8], rows[8:10], rows[10:])
    from lmas.models.providers import tiny

    fresh = lambda: tiny(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=0)  # noqa: E731
    _, on = _train_student(tiny_base, task, tmp_path / "on", cache=True, top_k=8, loss="gjsd", on_policy=1.0,
                           on_policy_tokens=4)
    assert on.fit_info()["on_policy_steps"] == 4 and len(on.kd) == 4  # every step on the student's samples
    _, again = _train_student(fresh(), task, tmp_path / "again", cache=True, top_k=8, loss="gjsd", on_policy=1.0,
                              on_policy_tokens=4)
    assert again.kd == pytest.approx(on.kd, rel=1e-5)  # the samples follow the seeded random state
    _, off = _train_student(fresh(), task, tmp_path / "off", cache=True, top_k=8, loss="gjsd")
    assert "on_policy_steps" not in off.fit_info() and len(off.kd) == 4  # lambda = 0: reported only when on
    assert on.kd[0] != pytest.approx(off.kd[0], rel=1e-3)  # other sequences (samples), other teachers' outputs
    with pytest.raises(ValueError, match=r"distill\.on_policy=1\.5"):
        Distill(on_policy=1.5)


def test_sampled_answers_follow_the_seed_and_differ_from_greedy(tiny_base):
    from lmas.evaluation.scoring import greedy_answers

    enc = PromptEncoder(tiny_base.tokenizer, 32)
    prompts = [f"{a} + {a} =" for a in range(6)]
    greedy = greedy_answers(tiny_base.model, enc, prompts, 6, 6)
    torch.manual_seed(3)
    hot = greedy_answers(tiny_base.model, enc, prompts, 6, 6, sample_temperature=5.0)
    torch.manual_seed(3)
    assert greedy_answers(tiny_base.model, enc, prompts, 6, 6, sample_temperature=5.0) == hot
    assert hot != greedy  # a near-uniform distribution over 49k tokens at T = 5
    with pytest.raises(ValueError, match="sample_temperature=0"):
        greedy_answers(tiny_base.model, enc, prompts, 6, 6, sample_temperature=0)


def test_the_compressed_top_k_cache_gives_the_float32_top_k_loss_within_fp16_rounding():
    from lmas.distill.losses import dense, kd_loss, topk
    from lmas.distill.teachers import CACHE_PROBS, TeacherCache, cache_ids

    gen = torch.Generator().manual_seed(0)
    vocab, k = 49152, 32
    teacher = torch.randn(10, vocab, generator=gen) * 4  # peaked enough that the top 32 hold most of the mass
    student = torch.randn(10, vocab, generator=gen) * 4
    values, indices = topk(teacher, k, 2.0)
    cache = TeacherCache(["t"], tokens=[[(values[:5].to(CACHE_PROBS), indices[:5].to(cache_ids(vocab))),
                                          (values[5:].to(CACHE_PROBS), indices[5:].to(cache_ids(vocab)))]])
    assert cache.bytes_per_token() == k * 4
    compressed = cache.tokens_for(torch.tensor([0, 1]), vocab)[0]
    exact = dense(values, indices, vocab)
    for loss in ("forward_kl", "reverse_kl", "gjsd"):
        want, got = kd_loss(student, exact, loss, 2.0), kd_loss(student, compressed, loss, 2.0)
        assert got.item() == pytest.approx(want.item(), rel=1e-3), loss


def test_specialists_route_each_task_to_the_agents_that_trained_it(tiny_base, news):
    pop = Population(tiny_base, agents=["a", "b", "c"], lora={"r": 4, "alpha": 8})
    pop.agents["a"].history.append({"event": "trained", "task": "news"})
    pop.agents["b"].history.append({"event": "trained", "task": "other"})
    assert Distill(teachers="specialists").teachers_for(pop, "c", news) == ["a"]
    assert Distill(teachers="peers").teachers_for(pop, "c", news) == ["a", "b"]
    assert Distill(teachers=["b", "c"]).teachers_for(pop, "c", news) == ["b"]
    with pytest.raises(ValueError, match=r"unknown agents \['zz'\]"):
        Distill(teachers=["zz"]).teachers_for(pop, "c", news)


def test_specialists_are_the_agents_that_trained_the_task_in_an_earlier_round(tiny_base, news):
    """Students trained one after the other in a round are not each other's specialists: who teaches a student must
    not depend on the order its round trains them in (the distillation losses study once taught its third student
    by the specialist and the two students before it)."""
    pop = Population(tiny_base, agents=["spec", "s1", "s2"], lora={"r": 4, "alpha": 8})
    pop.agents["spec"].history.append({"round": 0, "event": "trained", "task": "news"})
    pop.agents["s1"].history.append({"round": 1, "event": "trained", "task": "news"})  # earlier in round 1
    d = Distill(teachers="specialists")
    d.round = 1
    assert d.teachers_for(pop, "s2", news) == ["spec"]
    d.round = 2  # a later round: s1 is a specialist now
    assert d.teachers_for(pop, "s2", news) == ["spec", "s1"]
    d.round = None  # outside a loop: every agent that trained it
    assert d.teachers_for(pop, "s2", news) == ["spec", "s1"]


def test_every_student_of_the_losses_preset_is_taught_by_the_task_specialist_alone(run_lmas, fast_overrides, tmp_path):
    res = run_lmas([*fast_overrides, "experiment=distillation/losses"], tmp_path / "run")
    for student in ("s_kl", "s_rkl", "s_jsd", "s_gkd", "s_skew"):
        events = [e for e in res["agents"][student]["history"] if e["event"] == "trained"]
        assert [(e["task"], e["teachers"]) for e in events] == [(t, [t]) for t in ("bbc", "chat", "math")], student
    assert all("teachers" not in e for e in res["agents"]["s_none"]["history"])


def test_minilm_teacher_teaches_a_smollm2_tokenizer_student_through_labels(tiny_base, news, tmp_path):
    """A BERT-architecture teacher with its own tokenizer; the student (SmolLM2 tokenizer) learns
    from its label distributions."""
    from lmas.distill.encoder_teacher import EncoderTeacher

    teacher = EncoderTeacher(steps=100)
    pop = Population(tiny_base, agents=["student"], lora={"r": 4, "alpha": 8}, seed=0)
    strategy = Recorder(teachers=[], external=[teacher], temperature=1.0)
    loop = ContinualLoop(pop, Stream("s", [news]), strategy, tmp_path, seed=0,
                         train=TrainConfig(lr=5e-3, max_steps=3, batch_size=4),
                         eval=EvalConfig(batch_size=8, initial=False), progress=False, save_adapters=False)
    loop.run()
    assert len(strategy.kd) == 2 and all(v > 0 for v in strategy.kd)  # 8 examples, batch 4, one epoch
    assert teacher.tokenizer.vocab_size != pop.tokenizer.vocab_size  # really another vocabulary
    scores = teacher.label_scores([ex.prompt for ex in news.train], news.labels)
    gold = torch.tensor([news.labels.index(ex.answer) for ex in news.train])
    assert (scores.argmax(-1) == gold).float().mean() == 1.0  # the head learnt the training split
    # the teacher's own accuracy is recorded in the student's history (read by experiments/tables.py)
    (fit,) = [e for e in pop.agents["student"].history if e["event"] == "trained"]
    acc = fit["external_teacher_accuracy"]["minilm"]
    for split in ("val", "test"):
        rows = getattr(news, split)
        expect = (teacher.label_scores([ex.prompt for ex in rows], news.labels).argmax(-1)
                  == torch.tensor([news.labels.index(ex.answer) for ex in rows])).float().mean().item()
        assert acc[split] == pytest.approx(expect)
    with pytest.raises(ValueError, match="token-level distillation needs teachers"):
        Distill(teachers=[], external=[teacher]).before_task(
            type("M", (), {"population": pop, "agent": "student", "encoder": None, "examples": []}),
            Task("g", "generation", [Example("q", "a")], [], [Example("q", "a")]))


def test_route_to_gold_picks_the_teacher_likeliest_to_give_each_gold_answer():
    from lmas.distill.teachers import route_to_gold

    p = torch.tensor([[[0.7, 0.3], [0.2, 0.8], [0.5, 0.5]],  # teacher 0: 3 positions, 2 classes
                      [[0.4, 0.6], [0.9, 0.1], [0.5, 0.5]]])  # fmt: skip
    gold = torch.tensor([0, 0, 1])
    w = route_to_gold(p, gold)  # per position: 0.7 vs 0.4 -> t0; 0.2 vs 0.9 -> t1; a tie -> the first
    assert w.tolist() == [[1, 0, 1], [0, 1, 0]]
    rows = torch.tensor([0, 0, 1])  # example 0 spans positions 0-1: log .7 + log .2 < log .4 + log .9 -> t1
    assert route_to_gold(p, gold, rows).tolist() == [[0, 0, 1], [1, 1, 0]]


@pytest.mark.parametrize("kind", ["classification", "generation"])
def test_gold_routing_distils_each_example_from_its_routed_teacher_alone(tiny_base, news, kind):
    """The routed target is, per example, the routed teacher's own distribution (checked against a one-teacher
    Distill on the examples routed to it); the history counts the examples per teacher."""
    pop = Population(tiny_base, agents=["t1", "t2", "student"], lora={"r": 4, "alpha": 8}, seed=0)
    _randomise(pop, ["t1", "t2"], seed=3)
    enc = PromptEncoder(pop.tokenizer, 64)
    if kind == "classification":
        task = news
    else:
        rows = [Example(f"{a} + {b} =", str(a + b)) for a in range(4) for b in range(3)]
        task = Task("add", "generation", rows[:8], rows[8:10], rows[10:])
    module = _Module(pop, enc, task)
    routed = Distill(teachers=["t1", "t2"], routing="gold", temperature=1.0, top_k=64)
    routed.before_task(module, task)
    pop.model.eval()
    out = module.out()
    kd = routed.loss_terms(module, module.batch, out)["kd"].item()
    counts = dict(routed.routed)
    assert sum(counts.values()) == len(task.train) and set(counts) == {"t1", "t2"}  # both teach some examples
    # the same term from two one-teacher Distills, each on the examples routed to its teacher
    cache = routed.current
    index = module.batch["index"]
    if kind == "classification":
        labels = task.class_labels
        teacher = cache.labels_for(index)
        gold = torch.tensor([labels.index(ex.answer) for ex in task.train])
        from lmas.distill.teachers import route_to_gold

        w = route_to_gold(teacher, gold)
    else:
        from lmas.distill.teachers import route_to_gold

        teacher = cache.tokens_for(index, out["logits"].shape[-1])
        w = route_to_gold(teacher, out["targets"], out["rows"])
    target = (w[..., None] * teacher).sum(0)
    picked = teacher[w.argmax(0), torch.arange(teacher.shape[1])]  # each position: its routed teacher's distribution
    torch.testing.assert_close(target, picked)
    assert {"t1": int(w[0].sum()), "t2": int(w[1].sum())} == counts or kind == "generation"  # positions vs examples
    from lmas.distill.losses import kd_loss

    if kind == "classification":  # the student's label distribution, as the strategy scores it
        pop.activate("student")
        student = label_logprobs(pop.model, enc, [ex.prompt for ex in task.train], task.class_labels)
    else:
        student = out["logits"]
    assert kd == pytest.approx(kd_loss(student, picked, "forward_kl", 1.0).item(), rel=1e-4)
    assert kd > 0
    plain = Distill(teachers=["t1", "t2"], temperature=1.0, top_k=64)
    plain.before_task(module, task)
    assert plain.loss_terms(module, module.batch, out)["kd"].item() != pytest.approx(kd)  # not the uniform mixture
    with pytest.raises(ValueError, match="distill.routing='oracle'"):
        Distill(routing="oracle")


def test_a_routed_run_records_the_examples_each_teacher_taught(tiny_base, news, tmp_path):
    pop, strategy = _train_student(tiny_base, news, tmp_path, routing="gold", temperature=1.0)
    routed = strategy.fit_info()["routed"]
    assert set(routed) <= {"t1", "t2"} and sum(routed.values()) == 4 * 4  # 4 steps of 4 examples
    trained = [e for e in pop.agents["student"].history if e.event == "trained"]
    assert trained[-1].details["routed"] == routed
