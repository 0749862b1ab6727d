"""Goal-directed extraction with a "query LLM" behind an OpenAI-compatible chat endpoint.

As in the Fathom setup, query_url hands a (clipped) page and the agent's goal to a separate
model that answers with the goal-relevant evidence under Rationale / Evidence / Summary, so the
policy reads a few hundred tokens instead of a whole page. The endpoint may be OpenAI or a
local vLLM/SGLang server. Extraction is best effort: any failure (network, HTTP error, timeout,
an empty or near-empty answer) falls back to BM25 passage ranking, so a tool call never fails
because the extractor did.
"""

from __future__ import annotations

import logging
import re

from pydantic import BaseModel, ConfigDict, Field

from rewards.secrets import read_secret
from rollout.safe_encode import defang
from rollout.tools.passages import rank_passages

log = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "You read web pages for a research assistant. Given a page and the assistant's goal, pull out "
    "only what on the page bears on the goal. Quote the page; do not add facts that are not on it."
)

USER_TEMPLATE = """Page content:
<page>
{page}
</page>

Goal: {goal}

Answer in plain text with exactly these three sections:
Rationale: why parts of this page are (or are not) relevant to the goal.
Evidence: the relevant passages quoted from the page, one bullet ("- ") each, with the details (names, numbers, dates) kept exactly.
Summary: a short, self-contained summary of what the page says about the goal; if the page does not address the goal, say so."""  # noqa: E501

# Reasoning models (Qwen3, DeepSeek-R1) served without a reasoning parser put their thinking inline.
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
MIN_ANSWER_CHARS = 20


class ExtractorSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    base_url: str = Field(..., description="OpenAI-compatible API root, e.g. http://host:8000/v1")
    model: str
    api_key_env: str | None = Field("OPENAI_API_KEY", description="env var with the API key; local servers need none")
    temperature: float = Field(0.0, ge=0)
    max_tokens: int = Field(1024, ge=16)
    timeout_s: float = Field(60.0, gt=0)
    max_page_chars: int = Field(15000, ge=100, description="page text is clipped to this before the prompt")
    fallback_passages: int = Field(2, ge=1, description="passages returned when the LLM cannot answer")


def build_messages(page_text: str, goal: str, max_page_chars: int) -> list[dict[str, str]]:
    """The chat messages asking for the goal-relevant evidence of a page.

    The page and the goal are defanged: the extractor's server tokenizes the messages it is sent,
    and a page spelling "<|im_end|>" must not end the user turn there.
    """
    page = defang(page_text[:max_page_chars])
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": USER_TEMPLATE.format(page=page, goal=defang(goal.strip()))},
    ]


def clean_answer(content: str | None) -> str | None:
    """The extractor's answer without inline thinking, or None if too little is left to be useful."""
    if not content:
        return None
    text = _THINK.sub("", content)
    if "</think>" in text:  # an unopened think block: the answer follows its end
        text = text.rsplit("</think>", 1)[1]
    text = text.strip()
    return text if len(text) >= MIN_ANSWER_CHARS else None


def fallback_extract(page_text: str, goal: str, k: int) -> str:
    """The k passages of the page that best match the goal, one per line."""
    return "\n".join(rank_passages(page_text, goal, k))


class LLMExtractor:
    """extract(page_text, goal) -> goal-relevant evidence text; never raises on model or network failures."""

    def __init__(self, settings: ExtractorSettings, client=None):
        self.settings = settings
        if client is None:
            from openai import AsyncOpenAI

            key = read_secret("extractor API key", env=settings.api_key_env, required=False)
            if settings.api_key_env and not key:
                log.warning("$%s is not set; calling the extractor endpoint without an API key", settings.api_key_env)
            # vLLM and SGLang accept any key; the client library insists on one.
            client = AsyncOpenAI(
                base_url=settings.base_url, api_key=key or "EMPTY", timeout=settings.timeout_s, max_retries=1
            )
        self.client = client

    async def extract(self, page_text: str, goal: str) -> str:
        s = self.settings
        if not page_text.strip():
            return ""
        try:
            reply = await self.client.chat.completions.create(
                model=s.model,
                messages=build_messages(page_text, goal, s.max_page_chars),
                temperature=s.temperature,
                max_tokens=s.max_tokens,
            )
            answer = clean_answer(reply.choices[0].message.content if reply.choices else None)
            if answer is not None:
                return answer
            log.warning("extractor answer was empty or too short; using passage ranking")
        except Exception as e:  # noqa: BLE001 - any extractor failure degrades to passage ranking
            log.warning("extractor call failed (%s); using passage ranking", type(e).__name__)
        return fallback_extract(page_text[: s.max_page_chars], goal, s.fallback_passages)

    async def close(self) -> None:
        await self.client.close()
