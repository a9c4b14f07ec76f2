"""Multi-turn chat with ``select`` and ``gen`` (SGLang frontend language).

The first assistant turn is a ``select`` (SGLang scores each choice and picks the likeliest),
the second a free ``gen``; the conversation keeps its earlier turns, so the second turn's
prompt starts with the first one's (the radix cache shares it).

    python examples/chat_select.py --url http://127.0.0.1:30000
"""

from __future__ import annotations

from dataclasses import dataclass

import sglang as sgl

CONTINENTS = ["Europe", "Asia", "Africa", "America"]


@sgl.function
def trip_chat(s, city: str):  # type: ignore[no-untyped-def]
    s += sgl.system("You are a helpful travel assistant. Answer briefly.")
    s += sgl.user(f"I am planning a trip to {city}. On which continent is {city}?")
    s += sgl.assistant(sgl.select("continent", choices=CONTINENTS))
    s += sgl.user(f"Name one famous landmark in {city}.")
    s += sgl.assistant(sgl.gen("landmark", max_tokens=32, stop=["\n", "<|im_end|>"],
                               temperature=0))


@dataclass(frozen=True)
class TripAnswer:
    city: str
    continent: str  # one of CONTINENTS
    landmark: str
    turns: int  # messages in the conversation (system + 2 x (user, assistant))


def run(city: str = "Paris") -> TripAnswer:
    """Run the program on the default backend (see ``_common.connect``)."""
    state = trip_chat.run(city=city)
    return TripAnswer(city=city, continent=state["continent"],
                      landmark=state["landmark"].strip(), turns=len(state.messages()))


if __name__ == "__main__":
    from _common import connect, parse_args

    args = parse_args(__doc__.splitlines()[0])
    connect(args.url, args.chat_template)
    for city in ("Paris", "Tokyo"):
        print(run(city))
