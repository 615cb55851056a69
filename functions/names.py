"""Names that the platform takes from clients, and the one place their rules are checked.

Tenant, function and plan names become folder names, URL paths, host names, Kubernetes names and header values,
so they are DNS labels. Key names are free text for people, on one line. Invoice periods are ``YYYY-MM``.

Every rule is matched against the *whole* value (``re.fullmatch``): with ``re.match`` and ``$``, a name ending in a
newline passed (``$`` also matches before a final newline), and a tenant ``"xss\\n"`` got a data folder of that
name, a function ``"fn\\n"`` a worker that could never be reached, and ``2026-12\\n`` a Content-Disposition header
that broke the response. A refused value is shown in the message cut short (``functions.bounds.shown``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from functions.bounds import shown
from functions.errors import BadRequest

DNS_LABEL = r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?"
"""Kept identical in scaler/wake.py (the scaler imports nothing of ours; tests/security/test_api_inputs.py checks)."""


@dataclass(frozen=True)
class Rule:
    pattern: re.Pattern[str]
    says: str
    """The rule, for the message that refuses a value."""

    def ok(self, value: str) -> bool:
        return self.pattern.fullmatch(value) is not None


_LABEL = Rule(
    re.compile(DNS_LABEL),
    "1-63 characters: lowercase letters, digits and '-', starting with a letter and not ending with '-'",
)
RULES: dict[str, Rule] = {
    "tenant": _LABEL,
    "function": _LABEL,
    "plan": _LABEL,
    "key": Rule(
        re.compile(r"[^\x00-\x1f\x7f-\x9f\u2028\u2029]{0,100}"), "at most 100 characters, on one line"
    ),
    "period": Rule(re.compile(r"[0-9]{4}-(0[1-9]|1[0-2])"), "a month as YYYY-MM, e.g. 2026-11"),
}


def problem(kind: str, value: object) -> str | None:
    """None when VALUE is a valid KIND name (tenant, function, plan, key, period), else what is wrong with it."""
    rule = RULES[kind]
    if isinstance(value, str) and rule.ok(value):
        return None
    what = "period" if kind == "period" else f"{kind} name"
    return f"{what} {shown(value)} is not valid: {rule.says}"


def check(kind: str, value: str) -> str:
    """VALUE if it is a valid KIND name; else a 400 saying the rule."""
    if message := problem(kind, value):
        raise BadRequest(message)
    return value


def file_name(text: str) -> str:
    """TEXT with every character but letters, digits, '.', '_' and '-' made '_': a file name safe to put in a
    Content-Disposition header, also for a name stored before these rules held."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)
