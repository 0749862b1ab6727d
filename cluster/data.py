"""The questions and pages of a run: the seeded demo world, or a user's JSONL files."""

from __future__ import annotations

from dataclasses import dataclass

from cluster.config import ConfigError, RunConfig
from rollout.dataset import load_questions_jsonl, mixed_hops_subset, split_questions
from rollout.demo_world import build_demo_world
from rollout.tools.corpus import Document, load_corpus_jsonl
from rollout.types import Question


@dataclass
class RunData:
    train: list[Question]
    heldout: list[Question]
    documents: list[Document]

    def by_id(self) -> dict[str, Question]:
        return {q.id: q for q in [*self.train, *self.heldout]}


def load_run_data(cfg: RunConfig) -> RunData:
    d = cfg.data
    if d.source == "demo":
        world = build_demo_world(d.seed, d.demo.countries, d.demo.heldout_fraction, hops=tuple(d.demo.hops))
        train, heldout, documents = world.train, world.heldout, world.documents
    else:
        questions = load_questions_jsonl(d.path)
        if d.eval_path is not None:
            train, heldout = questions, load_questions_jsonl(d.eval_path)
        else:
            train, heldout = split_questions(questions, 0.2, d.seed)
        # The web backend searches the web: no local pages.
        documents = load_corpus_jsonl(cfg.tools.corpus_path) if cfg.tools.backend == "corpus" else []
    if d.train_size is not None:
        train = mixed_hops_subset(train, d.train_size)
    if len(train) < cfg.pipeline.questions_per_step:
        raise ConfigError(
            f"pipeline.questions_per_step={cfg.pipeline.questions_per_step} is more than the {len(train)} training "
            "questions; lower it or give more questions"
        )
    # The held-out set is sampled once per world so that every eval of a run sees the same questions.
    return RunData(train, heldout[: d.eval_size], documents)
