"""The simulated provider (see app.py); `python -m meterproxy.simulator --port P` serves it."""

from meterproxy.simulator.app import Simulator, build_app, main, run
from meterproxy.simulator.plan import MODELS, Choice, Knobs, Reply, plan_chat
from meterproxy.simulator.tokens import count_tokens, encoding_for, is_reasoning_model, prompt_tokens, words

__all__ = ["MODELS", "Choice", "Knobs", "Reply", "Simulator", "build_app", "count_tokens", "encoding_for",
           "is_reasoning_model", "main", "plan_chat", "prompt_tokens", "run", "words"]
