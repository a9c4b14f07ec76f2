"""Constrained generation: a regex-constrained ``gen`` and a JSON-schema-constrained ``gen``.

SGLang's grammar backend masks the tokens that would leave the regex or the schema, so the
output parses whatever the model's skill: an integer age, then a JSON profile that validates
against ``PROFILE_SCHEMA``.

    python examples/constrained.py --url http://127.0.0.1:30000
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import sglang as sgl

AGE_REGEX = r"[1-9][0-9]?"
PROFILE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 20},
        "weapon": {"type": "string", "enum": ["sword", "bow", "staff"]},
        "level": {"type": "integer", "minimum": 1, "maximum": 99},
    },
    "required": ["name", "weapon", "level"],
    "additionalProperties": False,
}


@sgl.function
def character(s, name: str):  # type: ignore[no-untyped-def]
    s += f"{name} is a hero in a fantasy story.\n"
    s += f"{name}'s age in years: " + sgl.gen("age", regex=AGE_REGEX, max_tokens=4,
                                               temperature=0) + "\n"
    s += f"{name}'s profile as JSON: " + sgl.gen("profile", json_schema=json.dumps(PROFILE_SCHEMA),
                                                  max_tokens=80, temperature=0)


@dataclass(frozen=True)
class Character:
    age_text: str  # matches AGE_REGEX
    profile: dict[str, Any]  # validates against PROFILE_SCHEMA


def run(name: str = "Aria") -> Character:
    """Run the program on the default backend; raises ValueError if the profile is not JSON."""
    state = character.run(name=name)
    try:
        profile = json.loads(state["profile"])
    except json.JSONDecodeError as exc:
        raise ValueError(f"constrained output is not JSON: {state['profile']!r}") from exc
    return Character(age_text=state["age"], profile=profile)


if __name__ == "__main__":
    from _common import connect, parse_args

    args = parse_args(__doc__.splitlines()[0])
    connect(args.url, args.chat_template)
    print(run("Aria"))
