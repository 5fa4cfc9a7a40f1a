"""Frontend output processing: detokenize token deltas, apply stop strings, gather n children.

The engine core streams token ids; this turns them into `RequestOutput`s with
cumulative and delta text. A stop string found here finishes the child, and the
caller must abort it in the core (the core cannot see text).
"""
from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field

from lockgate.engine.frontend.detokenizer import IncrementalDetokenizer
from lockgate.engine.frontend.input_processor import child_request_ids
from lockgate.engine.messages import EngineCoreOutput, TokenLogprob
from lockgate.engine.outputs import CompletionOutput, Logprob, RequestOutput, RequestTimes
from lockgate.engine.sampling_params import SamplingParams
from lockgate.engine.tokenizer import Tokenizer


@dataclass(slots=True)
class ChildState:
    index: int
    detok: IncrementalDetokenizer
    want_logprobs: bool
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    times: RequestTimes | None = None  # set by its first output


@dataclass(slots=True)
class ParentState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[ChildState]
    num_cached_tokens: int = 0
    times: list[RequestTimes] = field(default_factory=list)  # children that have started
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # once the core sent them
    embedding: list[float] | None = None  # a pooling request's, with its finishing output

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.children)


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, clock_offset: float | None = None) -> None:
        self.tokenizer = tokenizer
        # The engine core's Unix-minus-monotonic offset (in process: our own).
        self.clock_offset = time.time() - time.monotonic() if clock_offset is None else clock_offset
        self.parents: dict[str, ParentState] = {}
        self.child_to_parent: dict[str, tuple[ParentState, ChildState]] = {}
        self._token_text: dict[int, str] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams) -> None:
        children = []
        parent = ParentState(request_id, prompt, prompt_token_ids, children)
        for i, cid in enumerate(child_request_ids(request_id, params.n)):
            child = ChildState(i, IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params),
                               params.logprobs is not None)
            children.append(child)
            self.child_to_parent[cid] = (parent, child)
        self.parents[request_id] = parent

    def has_unfinished(self) -> bool:
        return bool(self.parents)

    def abort(self, request_id: str) -> list[str]:
        """Finish a parent as aborted; returns the child ids the core must abort."""
        parent = self.parents.pop(request_id, None)
        if parent is None:
            return []
        ids = child_request_ids(request_id, len(parent.children))
        for cid in ids:
            self.child_to_parent.pop(cid, None)
        return ids

    def _decode_token(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def _logprobs(self, child: ChildState, token_ids: list[int], lps: list[TokenLogprob] | None) -> None:
        if not lps:
            return
        for tok, lp in zip(token_ids, lps):
            child.cumulative_logprob += lp.logprob
            if child.want_logprobs:
                entry = {tok: Logprob(lp.logprob, self._decode_token(tok))}
                for tid, val in lp.top:
                    entry.setdefault(tid, Logprob(val, self._decode_token(tid)))
                child.logprobs.append(entry)

    def process(self, outputs: list[EngineCoreOutput],
                timestamp: float | None = None) -> tuple[list[RequestOutput], list[str]]:
        """Returns one RequestOutput per parent that progressed, and the child ids the
        core must abort because a stop string ended them here.

        `outputs` of a RequestOutput holds the children that changed this step; the
        final RequestOutput (finished=True) holds all of them, in index order.
        `timestamp`: when the core sampled these tokens, on its monotonic clock (None: now).
        """
        now = time.monotonic() if timestamp is None else timestamp
        changed: dict[str, tuple[ParentState, dict[int, CompletionOutput]]] = {}
        to_abort: list[str] = []
        for out in outputs:
            entry = self.child_to_parent.get(out.request_id)
            if entry is None:
                continue  # aborted in the frontend while this step ran
            parent, child = entry
            if child.finish_reason is not None:
                continue
            if out.num_cached_tokens:
                parent.num_cached_tokens = out.num_cached_tokens
            if out.prompt_logprobs is not None and parent.prompt_logprobs is None:
                parent.prompt_logprobs = self._prompt_logprobs(parent.prompt_token_ids, out.prompt_logprobs)
            if out.embedding is not None:
                parent.embedding = list(struct.unpack(f"<{len(out.embedding) // 4}f", out.embedding))
            if child.times is not None:
                child.times.last_token = now
            elif out.start_times is not None:
                queued, scheduled = out.start_times
                child.times = RequestTimes(out.request_id, queued, scheduled, now, now, self.clock_offset)
                parent.times.append(child.times)
            if out.num_draft_tokens and child.times is not None:
                child.times.num_draft_tokens = out.num_draft_tokens
                child.times.num_accepted_tokens = out.num_accepted_tokens
            ids = out.new_token_ids
            # The EOS or stop token that ended the sequence counts as a token but, as in
            # vLLM, its text stays out of the output unless asked for.
            hide_last = (out.finish_reason == "stop" and not isinstance(out.stop_reason, str)
                         and not child.detok.params.include_stop_str_in_output)
            delta, stop = child.detok.append(ids[:-1] if hide_last else ids)
            if hide_last and stop is None:
                child.detok.append_hidden(ids[-1:])
            self._logprobs(child, out.new_token_ids, out.new_logprobs)
            if stop is not None:
                child.finish_reason, child.stop_reason = "stop", stop
                if out.finish_reason is None:
                    to_abort.append(out.request_id)
            elif out.finish_reason is not None:
                child.finish_reason, child.stop_reason = out.finish_reason, out.stop_reason
            if child.finish_reason is not None:
                delta += child.detok.flush()
            changed.setdefault(parent.request_id, (parent, {}))[1][child.index] = \
                self._completion(child, delta, out.new_token_ids)
        results = []
        for rid, (parent, comps) in changed.items():
            finished = parent.finished
            if finished:
                for c in parent.children:
                    comps.setdefault(c.index, self._completion(c, "", []))
                self.abort(rid)  # drops the bookkeeping; nothing left in the core
            results.append(RequestOutput(
                request_id=rid, prompt=parent.prompt, prompt_token_ids=parent.prompt_token_ids,
                outputs=[comps[i] for i in sorted(comps)], finished=finished,
                num_cached_tokens=parent.num_cached_tokens, engine_times=parent.times,
                prompt_logprobs=parent.prompt_logprobs, embedding=parent.embedding))
        return results, to_abort

    def _prompt_logprobs(self, prompt_ids: list[int],
                         entries: list[TokenLogprob]) -> list[dict[int, Logprob] | None]:
        """vLLM's shape: None for the first token, then per position the prompt token (with its
        rank) and the top alternatives (ranks 1..N), each with its text (cached per token id)."""
        out: list[dict[int, Logprob] | None] = [None]
        decode = self._decode_token
        for tok, lp in zip(prompt_ids[1:], entries):
            entry = {tok: Logprob(lp.logprob, decode(tok), lp.rank)}
            for rank, (tid, val) in enumerate(lp.top, 1):
                if tid not in entry:
                    entry[tid] = Logprob(val, decode(tid), rank)
            out.append(entry)
        return out

    @staticmethod
    def _completion(child: ChildState, delta: str, delta_ids: list[int]) -> CompletionOutput:
        return CompletionOutput(
            index=child.index, text=child.detok.text, token_ids=list(child.detok.token_ids),
            finish_reason=child.finish_reason, stop_reason=child.stop_reason,
            cumulative_logprob=child.cumulative_logprob if child.want_logprobs else None,
            logprobs=child.logprobs if child.want_logprobs else None,
            delta_text=delta, delta_token_ids=list(delta_ids))
