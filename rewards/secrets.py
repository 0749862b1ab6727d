"""API keys for the remote services a run calls (LLM judge, web search, page extractor): one set of rules.

A key file wins over the environment; its first line is the key. A configured source that cannot
be read, or an empty key file, is an error naming the setting to fix, raised at construction so a
run fails at start-up rather than on every call. A key is never part of an error message.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def read_secret(
    what: str, *, file: Path | None = None, file_setting: str = "the key file", env: str | None = None,
    required: bool = True, optional_hint: str = "", error: type[Exception] = ValueError,
    environ: Mapping[str, str] | None = None,
) -> str | None:
    """The key from `file`, else from the `env` variable; None when neither gives one and it is not required.

    `what` names the key in messages ("judge API key"); `file_setting` the config field of the file;
    `optional_hint` says how to run without a key (appended to the message when one is required).
    """
    if file is not None:
        path = file.expanduser()
        try:
            lines = path.read_text(encoding="utf-8").strip().splitlines()
        except OSError as e:
            reason = e.strerror or type(e).__name__
            raise error(f"the {what} file {path} cannot be read ({reason}); fix {file_setting} or unset it") from None
        if not lines or not lines[0].strip():
            raise error(f"the {what} file {path} is empty; write the key on its first line")
        return lines[0].strip()
    values = os.environ if environ is None else environ
    key = values.get(env, "").strip() if env else ""
    if key:
        return key
    if required:
        source = f"set the {env} environment variable or {file_setting}" if env else f"set {file_setting}"
        raise error(f"no {what}: {source}" + (f", or {optional_hint}" if optional_hint else ""))
    return None
