"""Keeping secrets out of what a run writes: config echoes, MLflow params, logs."""

from __future__ import annotations

import re

# A key whose value would be a secret ("password", "api_key", "hf_token", "client_secret"), not one
# that names where a secret comes from ("password_env", "api_key_file") nor a count of tokens
# ("max_tokens", "tokens_per_minute"): the config holds no secret by design, these are a safety net.
SECRET_KEY = re.compile(r"(password|passwd|secret|token|api_?key|credentials?)$", re.IGNORECASE)
# The password of a URL such as redis://:PASSWORD@host:6379/0 or https://user:PASSWORD@mlflow.
URL_PASSWORD = re.compile(r"(?P<head>\b[a-z][a-z0-9+.-]*://[^:/@\s]*):[^@/\s]+@", re.IGNORECASE)


def mask_url_passwords(text: str) -> str:
    return URL_PASSWORD.sub(r"\g<head>:***@", text)
