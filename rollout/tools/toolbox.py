"""search_urls and query_url: validate a model's tool call, run it on a backend, format the result.

Every outcome becomes a ToolCall record with a text the model reads; malformed calls
(bad JSON, unknown tool, bad arguments) and backend failures become error texts that tell
the model what to fix. Nothing here raises on model input.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from rollout.chat_format import ParsedCall, ToolCallError
from rollout.tools.base import ToolBackend, ToolError
from rollout.tools.passages import rank_passages
from rollout.types import ToolCall

NonEmpty = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2000)]


class SearchArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: NonEmpty
    top_k: int | None = Field(None, ge=1)


class QueryArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: NonEmpty
    goal: NonEmpty


TOOL_ARGS: dict[str, type[BaseModel]] = {"search_urls": SearchArgs, "query_url": QueryArgs}


def _argument_problem(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "arguments"
        msg = "unknown argument" if e["type"] == "extra_forbidden" else e["msg"]
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


class Toolbox:
    def __init__(
        self,
        backend: ToolBackend,
        *,
        default_top_k: int = 3,
        max_top_k: int = 10,
        page_chars: int = 15000,
        passages_per_query: int = 2,
        extractor=None,
    ):
        self.backend = backend
        # An LLMExtractor (goal-directed evidence through an LLM) or None for passage ranking.
        self.extractor = extractor
        self.default_top_k = default_top_k
        self.max_top_k = max_top_k
        self.page_chars = page_chars
        self.passages_per_query = passages_per_query

    @classmethod
    def from_config(cls, cfg, backend: ToolBackend, extractor=None) -> Toolbox:
        """From a ToolsConfig section (duck-typed: this package does not import the cluster config)."""
        return cls(
            backend,
            default_top_k=cfg.search_top_k,
            max_top_k=cfg.max_top_k,
            page_chars=cfg.page_chars,
            passages_per_query=cfg.passages_per_query,
            extractor=extractor,
        )

    async def call(self, parsed: ParsedCall | ToolCallError, turn: int) -> ToolCall:
        if isinstance(parsed, ToolCallError):
            return ToolCall(
                parsed.name, parsed.arguments, "malformed", parsed.reason, f"Error: {parsed.reason}", turn=turn
            )
        schema = TOOL_ARGS.get(parsed.name)
        if schema is None:
            reason = f"unknown tool {parsed.name!r}; the tools are {', '.join(TOOL_ARGS)}"
            return ToolCall(parsed.name, parsed.arguments, "unknown_tool", reason, f"Error: {reason}", turn=turn)
        try:
            args = schema.model_validate(parsed.arguments)
        except ValidationError as e:
            reason = f"bad arguments for {parsed.name}: {_argument_problem(e)}"
            return ToolCall(parsed.name, parsed.arguments, "bad_arguments", reason, f"Error: {reason}", turn=turn)
        try:
            if isinstance(args, SearchArgs):
                return await self._search(args, turn)
            return await self._query(args, turn)
        except ToolError as e:
            return ToolCall(parsed.name, parsed.arguments, "tool_error", str(e), f"Error: {e}", turn=turn)

    async def _search(self, args: SearchArgs, turn: int) -> ToolCall:
        top_k = min(args.top_k or self.default_top_k, self.max_top_k)
        hits = await self.backend.search(args.query, top_k)
        if hits:
            result = "\n".join(f"{i}. {h.title}\n{h.url}\n{h.snippet}" for i, h in enumerate(hits, 1))
        else:
            result = "No results."
        arguments = {"query": args.query, "top_k": top_k}
        return ToolCall("search_urls", arguments, result=result, urls=[h.url for h in hits], turn=turn)

    async def _query(self, args: QueryArgs, turn: int) -> ToolCall:
        page = await self.backend.fetch(args.url)
        text = page.text[: self.page_chars]
        if self.extractor is not None:
            body = await self.extractor.extract(text, args.goal) or "The page has no text."
        else:
            passages = rank_passages(text, args.goal, self.passages_per_query)
            body = "\n".join(passages) if passages else "The page has no text."
        result = f"{page.title}\n{body}" if page.title else body
        return ToolCall("query_url", {"url": args.url, "goal": args.goal}, result=result, urls=[page.url], turn=turn)
