"""`flashflex chat`: an interactive terminal chat on any model and plan, streaming tokens as they come.

Input: one line is one message; end a line with a backslash to continue on the next, or put the message between
two lines of three double quotes (paste mode). Commands: /reset (forget the conversation), /stats (how the model
runs: mode, plan, streamed bytes, bank hit rate, last answer's tokens/s), /help, /exit (or Ctrl-D). Ctrl-C
stops the current answer at its next token and keeps the session (and the partial answer).
"""

from __future__ import annotations

import json
import signal
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, TextIO

from orchestrator import api

HELP = ("type a message and press Enter (end a line with \\ to continue it, or paste between two \"\"\" lines); "
        "/reset, /stats, /help, /exit (or Ctrl-D); Ctrl-C stops an answer")


class StopFlag:
    """Set by Ctrl-C while an answer streams; the answer ends at its next token."""

    def __init__(self) -> None:
        self.set = False


@dataclass
class Conversation:
    """The messages so far and the options each answer uses."""

    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    max_tokens: int = 256
    temperature: float = 0.0

    def reset(self) -> None:
        self.messages.clear()

    def request(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages


def answer(llm, conv: Conversation, question: str, stop: StopFlag, write: Callable[[str], object]) -> dict[str, Any]:
    """Stream one answer to `question` through `write`; the answer (whole or stopped) joins the conversation."""
    conv.messages.append({"role": "user", "content": question})
    meter = api.RequestMeter()
    parts: list[str] = []
    stop.set = False
    chunks: Generator[dict, None, None] = llm.create_chat_completion(
        messages=conv.request(), stream=True, max_tokens=conv.max_tokens, temperature=conv.temperature)
    try:
        for chunk in chunks:
            delta = chunk["choices"][0].get("delta", {}).get("content")
            if delta:
                meter.token()
                parts.append(delta)
                write(delta)
            if stop.set:  # Ctrl-C: the generator is suspended between tokens, so closing it is clean
                break
    finally:
        chunks.close()
    conv.messages.append({"role": "assistant", "content": "".join(parts)})
    result = meter.result()
    result["stopped"] = stop.set
    return result


def read_message(readline: Callable[[str], str]) -> str | None:
    """One message from the user (None at end of input). Raises KeyboardInterrupt on Ctrl-C."""
    try:
        first = readline("> ")
    except EOFError:
        return None
    if first.strip() == '"""':
        lines = []
        while True:
            try:
                line = readline("")
            except EOFError:
                break
            if line.strip() == '"""':
                break
            lines.append(line)
        return "\n".join(lines)
    lines = [first]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        try:
            lines.append(readline("… "))
        except EOFError:
            break
    return "\n".join(lines)


def stats_lines(llm) -> list[str]:
    st = llm.flashflex.stats()
    lossy = f" (LOSSY: {'; '.join(st['lossy'])})" if st["lossy"] else ""
    lines = [f"model {st['model']}", f"mode {st['mode']}{lossy}"]
    plan = st.get("plan")
    if plan:
        lines.append(f"budget {plan['budget_bytes'] / 2**20:.0f} MiB, resident weights "
                     f"{plan['resident_bytes'] / 2**20:.0f} MiB, planned streaming "
                     f"{plan['streamed_bytes_per_token'] / 2**20:.1f} MiB/token")
    stream = st.get("runtime", {}).get("stream")
    if stream:
        lines.append(f"streamed {stream['bytes_read'] / 2**20:.1f} MiB so far, waited {stream['wait_seconds']:.2f}s")
    moe = st.get("runtime", {}).get("moe")
    if moe:
        lines.append(f"expert bank: {st['moe']['slots']} slots, hit rate {moe['hit_rate']:.1%}, "
                     f"{moe['bytes_read'] / 2**20:.1f} MiB read")
    last = st.get("last_request")
    if last:
        rate = last.get("decode_tok_per_s")
        lines.append(f"last answer: {last['completion_tokens']} tokens"
                     + (f", {rate:.1f} tok/s" if rate else "")
                     + (f", first token after {last['time_to_first_token_s']:.2f}s"
                        if last.get("time_to_first_token_s") is not None else ""))
    return lines


def template_note(llm) -> str | None:
    """One line when the model carries no chat template (a base model): its answers are not a conversation."""
    if llm.metadata.get("tokenizer.chat_template"):
        return None
    from pathlib import Path

    name = Path(llm.model_path).name
    how = f"llama-cpp-python's {llm.chat_format} format" if llm.chat_format else "a generic format"
    return (f"note: {name} has no chat template (a base model?): answers use {how} and may not follow the "
            "conversation — an instruction-tuned model answers better (chat's default, when no --model is given)")


def repl(llm, conv: Conversation, out: TextIO = sys.stdout, readline: Callable[[str], str] = input) -> None:
    """The interactive loop. Ctrl-C while answering stops the answer; at the prompt it clears the line."""
    stop = StopFlag()
    answering = False

    def on_sigint(_signum, _frame) -> None:
        if answering:
            stop.set = True  # the answer ends at its next token; the session goes on
        else:
            raise KeyboardInterrupt

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    previous = signal.signal(signal.SIGINT, on_sigint)  # for the whole session: no window without it
    try:
        out.write(f"flashflex chat · {llm.flashflex.prepared.spec.mode} · {HELP}\n")
        while True:
            try:
                message = read_message(readline)
            except KeyboardInterrupt:
                out.write("\n(Ctrl-D or /exit to quit)\n")
                continue
            if message is None:
                out.write("\n")
                return
            command = message.strip()
            if not command:
                continue
            if command in ("/exit", "/quit"):
                return
            if command == "/reset":
                conv.reset()
                out.write("(conversation cleared)\n")
                continue
            if command == "/stats":
                out.write("\n".join(stats_lines(llm)) + "\n")
                continue
            if command == "/help":
                out.write(HELP + "\n")
                continue
            if command.startswith("/"):
                out.write(f"unknown command {command.split()[0]} — {HELP}\n")
                continue
            answering = True
            try:
                result = answer(llm, conv, message, stop, write)
            finally:
                answering = False
            llm.flashflex.last_request = result
            out.write("\n" + ("[stopped]\n" if result["stopped"] else ""))
    finally:
        signal.signal(signal.SIGINT, previous)


def once(llm, conv: Conversation, question: str, out: TextIO = sys.stdout, as_json: bool = False) -> None:
    """--once: one answer, streamed to `out` (or one JSON object), then return."""
    stop = StopFlag()
    if as_json:
        parts: list[str] = []
        result = answer(llm, conv, question, stop, parts.append)
        llm.flashflex.last_request = result
        out.write(json.dumps({"question": question, "answer": "".join(parts), **result,
                              "stats": llm.flashflex.stats()}) + "\n")
        return
    result = answer(llm, conv, question, stop, lambda t: (out.write(t), out.flush()))
    llm.flashflex.last_request = result
    out.write("\n")
